"""MMBench (dev TSV with answers): option-letter parsing and circular evaluation.

The TSV holds each question once per rotation of its options, at index k * 1e6 + base index.
A question counts as right only when every one of its rotations is answered right (MMBench's
CircularEval, grouped by index % 1e6). Official MMBench evaluation asks ChatGPT to map an answer
to a letter when rule-based matching fails; we never call a model, so such an answer is wrong
and is counted under "unparsed" (the score is a lower bound of the GPT-assisted one).

llava: LLaVA submits raw outputs to the MMBench server; we apply that evaluator's rule-based
stage as VLMEvalKit ships it (`can_infer`): a reject phrase gives "Z" (wrong); else replace
. ( ) [ ] , : ; ! * # { } by spaces and split on whitespace; exactly one token equal to an offered
letter gives that letter; failing that, exactly one option whose text occurs (case-insensitive)
in the output gives its letter.
lmms-eval: its offline task `mmbench_en_dev_static` (`MMBench_Evaluator.eval_result` with
eval_method="static", tasks/mmbench/mmbench_evals.py). First `can_infer`, its copy of the
original MMBench script: split the stripped output on whitespace; exactly one bare token among
A-E gives the letter, unless "A" is a token of an output longer than 3 tokens ("A" may be an
article); then exactly one token of the forms X. X, X: X) X). (X) (X). :X :X, :X. :X) :X).
gives the letter; then the same option-text match. What that leaves goes, instead of to GPT, to
`extract_mcq_answer` (tasks/_task_utils/mcq_extract.py, `mcq_letter` below).
Answer records with a non-zero `round_id` (LLaVA's --all-rounds) are ignored.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence

from alignti.errors import AlignTIError
from alignti.eval.formats import MMBENCH_GROUP, EvalQuestion
from alignti.eval.scoring.matching import align, check_mode, percent

_REJECT = ("Sorry, I can't help with images of people yet.", "I can't process this file.",
           "I'm sorry, but without the image provided", "Cannot determine the answer")
_SEPARATORS = ".()[],:;!*#{}"
_LMMS_LETTERS = "ABCDE"
_LMMS_FORMS = (("", "."), ("", ","), ("", ":"), ("", ")"), ("", ")."), ("(", ")"), ("(", ")."), (":", ""),
               (":", ","), (":", "."), (":", ")"), (":", ")."))
_API_FAILED = "Failed to obtain answer via API"  # both option stages skip a failed GPT call's text
# extract_mcq_answer: the phrases after which a letter is the answer (matched lower-cased)...
_MCQ_PHRASES = ("the answer is", "answer is", "the correct answer is", "correct answer is", "the best answer is",
                "best answer is", "the correct option is", "correct option is", "the best option is",
                "best option is", "the choice is", "choice is", "the correct choice is", "correct choice is",
                "i choose", "i select", "i pick", "my answer is", "my choice is",
                "옵션", "정답은", "답은", "답:", "答案是", "答案为", "选", "答えは")
# ...and the rank of each way a letter can appear ("X " = the letter then a space).
_MCQ_FORMS = ((6, "({})"), (5, "{}."), (4, "{}:"), (3, "{})"), (2, "{} "))
_MCQ_START, _MCQ_END, _MCQ_PHRASE = 10, 9, 7
_MCQ_LETTERS = "ABCDEFGH"  # its default when a row offers no option


def _text_match(output: str, options: Mapping[str, str]) -> str | None:
    low = output.lower()
    found = [k for k, v in options.items() if str(v).lower() in low]
    return found[0] if len(found) == 1 else None


def _vlmeval_letter(output: str, options: Mapping[str, str]) -> str | None:
    if _API_FAILED in output:
        return None
    if any(r in output for r in _REJECT):
        return "Z"
    for c in _SEPARATORS:
        output = output.replace(c, " ")
    tokens = output.split()
    named = [k for k in options if k in tokens]
    if len(named) == 1:
        return named[0]
    return "Z" if not named and "Z" in tokens else None


def _lmms_letter(output: str) -> str | None:
    if _API_FAILED in output:
        return None
    tokens = output.split()
    bare = [c for c in _LMMS_LETTERS if c in tokens]
    if len(bare) == 1 and not ("A" in tokens and len(tokens) > 3):
        return bare[0]
    for pre, post in _LMMS_FORMS:
        hits = [c for c in _LMMS_LETTERS if pre + c + post in tokens]
        if len(hits) == 1:
            return hits[0]
    return None


def mcq_letter(output: str, letters: Sequence[str]) -> str | None:
    """lmms-eval's `extract_mcq_answer`: the best-ranked occurrence of one of `letters`, or None.

    Strip the output, then the characters , . ! ? ; : ' " from both ends (one character kind
    after the other, in that order), and pad it with a space on each side. Every letter is
    looked for as "(X)", "X.", "X:", "X)", "X " (its last occurrence), as its first occurrence
    after one of `_MCQ_PHRASES` (even inside a word), and as the first or last character with no
    letter beside it; if none of these occurs, anywhere. The highest rank wins, then the later
    position.
    """
    if not output.strip():
        return None
    text = output.strip()
    for c in ",.!?;:'\"":
        text = text.strip(c)
    text = f" {text} "
    found: list[tuple[int, int, str]] = []  # (rank, position, letter)
    for rank, form in _MCQ_FORMS:
        found += [(rank, text.rfind(form.format(x)), x) for x in letters if form.format(x) in text]
    low = text.lower()  # its positions index `text`, as in the original
    for phrase in _MCQ_PHRASES:
        at = low.find(phrase)
        if at != -1:
            found += [(_MCQ_PHRASE, text.find(x, at + len(phrase)), x) for x in letters
                      if text.find(x, at + len(phrase)) != -1]
    core = text.strip()
    found += [(_MCQ_START, 0, x) for x in letters if core.startswith(x) and (len(core) == 1 or not core[1].isalpha())]
    found += [(_MCQ_END, len(text) - 1, x) for x in letters
              if core.endswith(x) and (len(core) == 1 or not core[-2].isalpha())]
    if not found:
        found = [(0, text.rfind(x), x) for x in letters if x in text]
    # Two letters never share a rank and a position, so the letter never breaks a tie.
    return max(found)[2] if found else None


def mmbench_parse(output: str, options: Mapping[str, str], scoring: str = "llava") -> str | None:
    """The letter `output` names (possibly "Z", or a letter not offered), or None if no rule applies."""
    if scoring == "lmms-eval":
        output = output.strip()
        return (_lmms_letter(output) or _text_match(output, options)
                or mcq_letter(output, sorted(options) or _MCQ_LETTERS))
    return _vlmeval_letter(output, options) or _text_match(output, options)


def _rates(groups: dict[int, list[tuple[EvalQuestion, bool]]], field: str) -> dict[str, float]:
    by: dict[str, list[bool]] = defaultdict(list)
    for rows in groups.values():
        main = next((q for q, _ in rows if q.question_id == q.meta["group"]), rows[0][0])
        by[str(main.meta.get(field))].append(all(h for _, h in rows))
    return {k: percent(sum(v), len(v)) for k, v in sorted(by.items())}


def score_mmbench(questions: Sequence[EvalQuestion], answers: Sequence[Mapping], scoring: str = "llava") -> dict:
    """"score" = circular accuracy (percent of question groups with every rotation right);
    "vanilla_accuracy" on the main rows only (index < 1e6); per category / L2 category (circular)."""
    check_mode(scoring)
    if any(q.answer is None for q in questions):
        raise AlignTIError("this MMBench TSV has no 'answer' column (test split): submit the answers "
                           "to the MMBench server instead")
    # model_vqa_mmbench.py --all-rounds adds its own rotations as round_id 1..n-1 under the same
    # question_id; the TSV's circular copies already are the rotations, so only round 0 is scored.
    m = align(questions, [a for a in answers if not a.get("round_id")])
    groups: dict[int, list[tuple[EvalQuestion, bool]]] = defaultdict(list)
    unparsed = 0
    for q, out in zip(questions, m.outputs):
        letter = mmbench_parse(out, q.meta["options"], scoring) if out is not None else None
        unparsed += letter is None
        groups[q.meta["group"]].append((q, letter == q.answer))
    main = [h for rows in groups.values() for q, h in rows if int(q.question_id) < MMBENCH_GROUP]
    circular = percent(sum(all(h for _, h in rows) for rows in groups.values()), len(groups))
    return {"benchmark": "mmbench", "scoring": scoring, "score": circular, "circular_accuracy": circular,
            "vanilla_accuracy": percent(sum(main), len(main)), "n_groups": len(groups),
            "per_category": _rates(groups, "category"), "per_l2_category": _rates(groups, "l2_category"),
            "unparsed": unparsed, **m.counts()}
