"""ScienceQA (test split; headline = the image subset, "SQA-IMG").

llava (llava/eval/eval_science_qa.py): the output as is must be a letter A-E, or start with a
letter followed by ". " ("B. cat"), or contain "The answer is X" followed by any character
exactly once ("The answer is B."); the letter must name one of the problem's choices. Anything
else ("B.", "(B)", "b") is wrong.
lmms-eval (tasks/scienceqa/utils.py, `sqa_process_results`): the stripped output, lower-cased,
must equal the right letter lower-cased ("B" and "b" count), or the output must start with an
upper-case letter and a "." naming it ("B." and "B. cat" count; "b." and "The answer is B." do not).
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Mapping, Sequence

from alignti.eval.formats import EvalQuestion
from alignti.eval.scoring.matching import align, check_mode, percent

_LETTERS = ("A", "B", "C", "D", "E")
_ANSWER_IS = re.compile(r"The answer is ([A-Z]).")  # "." is any character, as in the original


def sqa_parse(output: str, n_choices: int) -> int:
    """LLaVA's rule: the choice index named by `output`, or -1."""
    if output in _LETTERS:  # exact: eval_science_qa.py neither strips nor upper-cases
        letter = output
    elif len(output) >= 3 and output[0] in _LETTERS and output[1:3] == ". ":
        letter = output[0]
    else:
        found = _ANSWER_IS.findall(output)
        letter = found[0] if len(found) == 1 else ""
    return _LETTERS.index(letter) if letter in _LETTERS[:n_choices] else -1


def sqa_correct(output: str, answer: int, n_choices: int, scoring: str = "llava") -> bool:
    """One ScienceQA prediction judged the way `scoring` judges it."""
    if scoring == "lmms-eval":
        # sqa_process_results: the whole output is compared lower-cased ("b" is right); the "X."
        # form needs an upper-case X, then its lower-case form is compared.
        pred, target = output.strip(), _LETTERS[answer].lower()
        if pred.lower() == target:
            return True
        return len(pred) >= 2 and pred[0].isupper() and pred[1] == "." and pred[0].lower() == target
    return sqa_parse(output, n_choices) == answer


def score_scienceqa(questions: Sequence[EvalQuestion], answers: Sequence[Mapping], scoring: str = "llava") -> dict:
    """"score" = accuracy (percent) on questions with an image; "accuracy_all" on every question;
    per-subject accuracy on the image subset."""
    check_mode(scoring)
    m = align(questions, answers)
    hits = [out is not None and sqa_correct(out, q.answer, len(q.meta["choices"]), scoring)
            for q, out in zip(questions, m.outputs)]
    img = [(q, h) for q, h in zip(questions, hits) if q.image is not None]
    subjects: dict[str, list[bool]] = defaultdict(list)
    for q, h in img:
        subjects[str(q.meta.get("subject"))].append(h)
    img_acc = percent(sum(h for _, h in img), len(img))
    return {"benchmark": "scienceqa", "scoring": scoring, "score": img_acc, "accuracy_image": img_acc,
            "accuracy_all": percent(sum(hits), len(hits)), "n_image": len(img),
            "per_subject_image": {k: percent(sum(v), len(v)) for k, v in sorted(subjects.items())}, **m.counts()}
