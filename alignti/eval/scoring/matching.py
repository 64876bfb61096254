"""Join answer records to questions, the one way every scorer (and resume) does it.

A record matches the question with its `question_id`; where several questions share that id
(TextVQA, MME) the record's `prompt` picks one through `question_core`, as LLaVA's
eval_textvqa.py and convert_answer_to_mme.py do. When a question is answered twice the last
record wins (LLaVA builds a dict the same way).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Mapping, Sequence

from alignti.errors import AlignTIError
from alignti.eval.formats import EvalQuestion, question_core

SCORING_MODES = ("llava", "lmms-eval")


@dataclass(frozen=True)
class Matched:
    """`outputs[i]` is the model text for `questions[i]`, None when it has no answer."""

    outputs: list[str | None]
    unmatched_answers: int
    duplicate_answers: int

    def counts(self) -> dict[str, int]:
        """Bookkeeping every scorer reports beside its metrics."""
        missing = sum(o is None for o in self.outputs)
        return {"n_questions": len(self.outputs), "n_answered": len(self.outputs) - missing, "missing": missing,
                "unmatched_answers": self.unmatched_answers, "duplicate_answers": self.duplicate_answers}


def _join(questions: Sequence[EvalQuestion], answers: Sequence[Mapping]) -> tuple[dict[str, Mapping], int, int]:
    """(matched {key: record}, records that matched no question, records that repeated a question)."""
    groups: dict[str, list[EvalQuestion]] = defaultdict(list)
    for q in questions:
        groups[str(q.question_id)].append(q)
    by_core = {(str(q.question_id), question_core(q.benchmark, q.prompt)): q
               for group in groups.values() if len(group) > 1 for q in group}
    matched: dict[str, Mapping] = {}
    unmatched = repeated = 0
    for rec in answers:
        qid = str(rec.get("question_id"))
        group = groups.get(qid, [])
        if len(group) == 1:
            q = group[0]
        elif group:
            q = by_core.get((qid, question_core(group[0].benchmark, str(rec.get("prompt", "")))))
        else:
            q = None
        if q is None:
            unmatched += 1
            continue
        repeated += q.key in matched
        matched[q.key] = rec
    return matched, unmatched, repeated


def match_answers(questions: Sequence[EvalQuestion], answers: Sequence[Mapping]) -> dict[str, Mapping]:
    """{question key: answer record} for every answered question (the resume check uses this too)."""
    return _join(questions, answers)[0]


def align(questions: Sequence[EvalQuestion], answers: Sequence[Mapping]) -> Matched:
    """Model outputs in question order, plus how many records matched nothing or repeated."""
    matched, unmatched, repeated = _join(questions, answers)
    return Matched([_text(matched.get(q.key)) for q in questions], unmatched, repeated)


def _text(rec: Mapping | None) -> str | None:
    if rec is None:
        return None
    text = rec.get("text")
    return text if isinstance(text, str) else ""  # load_answers rejects these; direct callers may not


def check_mode(scoring: str) -> None:
    """Reject an unknown scoring mode with one clear line."""
    if scoring not in SCORING_MODES:
        raise AlignTIError(f"unknown scoring {scoring!r}; choose one of {', '.join(SCORING_MODES)}")


def percent(hits: float, total: int) -> float:
    """100 * hits / total, 0 for an empty set (the reference scripts would divide by zero)."""
    return 100.0 * hits / total if total else 0.0
