"""The synthetic shapes corpus's test split: exact match after VQA normalisation.

Both sides go through EvalAI's answer processing (`normalize_vqa_answer`), so "Yes.", "Two"
and "the top left" match "yes", "2" and "top left". The corpus is ours, so there is no other
codebase to follow: both scoring modes give the same result.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence

from alignti.eval.formats import EvalQuestion
from alignti.eval.scoring.matching import align, check_mode, percent
from alignti.eval.scoring.vqa import normalize_vqa_answer


def score_shapes(questions: Sequence[EvalQuestion], answers: Sequence[Mapping], scoring: str = "llava") -> dict:
    """"score" = overall accuracy in percent; "per_question_type" beside it."""
    check_mode(scoring)
    m = align(questions, answers)
    types: dict[str, list[bool]] = defaultdict(list)
    hits = []
    for q, out in zip(questions, m.outputs):
        hit = out is not None and normalize_vqa_answer(out) == normalize_vqa_answer(q.answer)
        hits.append(hit)
        types[q.meta["question_type"]].append(hit)
    acc = percent(sum(hits), len(hits))
    return {"benchmark": "shapes", "scoring": scoring, "score": acc, "accuracy": acc,
            "per_question_type": {k: percent(sum(v), len(v)) for k, v in sorted(types.items())}, **m.counts()}
