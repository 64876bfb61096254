"""Benchmark scorers: pure functions `score_<bench>(questions, answers, scoring) -> dict`.

`questions` come from `alignti.eval.formats.load_questions`, `answers` are answer records (the
lines of an answers JSONL, `formats.load_answers`). `scoring` is "llava" (LLaVA's original
scripts, the default) or "lmms-eval" (lmms-eval's re-implementations); docs/eval.md lists how
they differ. Every result holds the headline metric under "score", its sub-metrics beside it,
and the bookkeeping n_questions / n_answered / missing / unmatched_answers / duplicate_answers.
A question without an answer is scored as an empty output.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from alignti.errors import AlignTIError
from alignti.eval.formats import EvalQuestion
from alignti.eval.scoring.gqa import score_gqa
from alignti.eval.scoring.matching import SCORING_MODES, match_answers
from alignti.eval.scoring.mmbench import score_mmbench
from alignti.eval.scoring.mme import score_mme
from alignti.eval.scoring.pope import score_pope
from alignti.eval.scoring.scienceqa import score_scienceqa
from alignti.eval.scoring.shapes import score_shapes
from alignti.eval.scoring.vqa import score_textvqa

SCORERS: dict[str, Callable[..., dict]] = {
    "gqa": score_gqa, "textvqa": score_textvqa, "pope": score_pope, "mme": score_mme,
    "scienceqa": score_scienceqa, "mmbench": score_mmbench, "shapes": score_shapes,
}


def score_benchmark(benchmark: str, questions: Sequence[EvalQuestion], answers: Sequence[Mapping],
                    scoring: str = "llava") -> dict:
    """Dispatch to the benchmark's scorer."""
    if benchmark not in SCORERS:
        raise AlignTIError(f"unknown benchmark {benchmark!r}; choose one of {', '.join(SCORERS)}")
    wrong = {q.benchmark for q in questions} - {benchmark}
    if wrong:
        raise AlignTIError(f"questions are from {sorted(wrong)}, not {benchmark!r}")
    return SCORERS[benchmark](questions, answers, scoring)


__all__ = ["SCORERS", "SCORING_MODES", "match_answers", "score_benchmark", "score_gqa", "score_mmbench",
           "score_mme", "score_pope", "score_scienceqa", "score_shapes", "score_textvqa"]
