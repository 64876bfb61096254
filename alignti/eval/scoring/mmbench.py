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
lmms-eval (tasks/mmbench/mmbench_evals.py, its copy of the original MMBench script, GPT step
left out): split the stripped output on whitespace; exactly one bare token among A-E gives the
letter, unless "A" is a token of an output longer than 3 tokens ("A" may be an article); then
exactly one token of the forms X. X, X: X) X). (X) (X). :X :X, :X. :X) :X). gives the letter;
then the same option-text match.
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


def _text_match(output: str, options: Mapping[str, str]) -> str | None:
    low = output.lower()
    found = [k for k, v in options.items() if str(v).lower() in low]
    return found[0] if len(found) == 1 else None


def _vlmeval_letter(output: str, options: Mapping[str, str]) -> str | None:
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
    tokens = output.split()
    bare = [c for c in _LMMS_LETTERS if c in tokens]
    if len(bare) == 1 and not ("A" in tokens and len(tokens) > 3):
        return bare[0]
    for pre, post in _LMMS_FORMS:
        hits = [c for c in _LMMS_LETTERS if pre + c + post in tokens]
        if len(hits) == 1:
            return hits[0]
    return None


def mmbench_parse(output: str, options: Mapping[str, str], scoring: str = "llava") -> str | None:
    """The letter `output` names (possibly "Z", or a letter not offered), or None if no rule applies."""
    if "Failed to obtain answer via API" in output:
        return None
    if scoring == "lmms-eval":
        output = output.strip()
        return _lmms_letter(output) or _text_match(output, options)
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
