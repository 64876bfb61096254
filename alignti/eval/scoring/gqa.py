"""GQA (testdev-balanced): exact match.

llava: scripts/convert_gqa_for_eval.py turns each output into `text.rstrip('.').lower()`, and
GQA's official eval.py counts `prediction == question["answer"]` (no other normalisation; the
gold answers are already lower case).
lmms-eval: the output is stripped, then HF `evaluate`'s exact_match with ignore_case and
ignore_punctuation: both sides lower-cased and every ASCII punctuation mark deleted.
"""

from __future__ import annotations

import string
from collections import defaultdict
from collections.abc import Mapping, Sequence

from alignti.eval.formats import EvalQuestion
from alignti.eval.scoring.matching import align, check_mode, percent

_NO_PUNCT = str.maketrans("", "", string.punctuation)


def gqa_correct(output: str, gold: str, scoring: str = "llava") -> bool:
    """One GQA prediction judged the way `scoring` judges it."""
    if scoring == "lmms-eval":
        return output.strip().lower().translate(_NO_PUNCT) == gold.lower().translate(_NO_PUNCT)
    return output.rstrip(".").lower() == gold


def _by_type(questions: Sequence[EvalQuestion], hits: list[bool], field: str) -> dict[str, float]:
    groups: dict[str, list[bool]] = defaultdict(list)
    for q, hit in zip(questions, hits):
        if q.meta.get(field):
            groups[q.meta[field]].append(hit)
    return {k: percent(sum(v), len(v)) for k, v in sorted(groups.items())}


def score_gqa(questions: Sequence[EvalQuestion], answers: Sequence[Mapping], scoring: str = "llava") -> dict:
    """Accuracy in percent under "score", plus GQA eval.py's per structural / semantic type accuracy."""
    check_mode(scoring)
    m = align(questions, answers)
    hits = [out is not None and gqa_correct(out, q.answer, scoring) for q, out in zip(questions, m.outputs)]
    acc = percent(sum(hits), len(hits))
    return {"benchmark": "gqa", "scoring": scoring, "score": acc, "accuracy": acc,
            "per_structural_type": _by_type(questions, hits, "structural"),
            "per_semantic_type": _by_type(questions, hits, "semantic"), **m.counts()}
