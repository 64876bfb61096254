"""The synthetic shapes corpus's test split: exact match of the final answer, per question type.

The output and the gold answer both go through `final_answer` (docs/eval.md, shapes):
1. If the text contains "the answer is" (any case), only what follows its last occurrence counts.
2. Otherwise, if the text is a sentence (ends with "." and has at least three words), its key
   is extracted: for a color / shape / position / existence / count question the last phrase
   of that type's answer set (a colour, a shape, a quadrant, yes/no, a number; "no" counts as
   0 in a count), for a description the size, colour and shape words in order. A sentence
   without such a phrase keeps all its words.
3. Everything else is compared whole, as before the long styles existed.
The text then goes through EvalAI's answer processing (`normalize_vqa_answer`: case,
punctuation, articles, number words), so "Yes.", "Two" and "the top left" match "yes", "2" and
"top left". A short answer (no "the answer is", not a sentence) is therefore scored exactly as
it always was, and the gold answers of every style reduce to the short ones.

The headline accuracy is over the five question types every style shares; description
questions (long styles only) get their own exact match and token F1 (SQuAD's: harmonic mean of
token precision and recall of the final answers). The corpus is ours, so there is no other
codebase to follow: both scoring modes give the same result.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence

from alignti.data.shapes_questions import DESCRIBE
from alignti.data.shapes_render import COLORS, POSITIONS, SHAPES, SIZES
from alignti.eval.formats import EvalQuestion
from alignti.eval.scoring.matching import align, check_mode, percent
from alignti.eval.scoring.vqa import normalize_vqa_answer

_ANSWER_IS = re.compile(r"the answer is", re.IGNORECASE)
# Each question type's answer set, as word tuples (count answers are any number, see _key).
_ANSWER_SETS: dict[str, tuple[tuple[str, ...], ...]] = {
    "color": tuple((c,) for c in COLORS), "shape": tuple((s,) for s in SHAPES),
    "position": tuple(tuple(p.split()) for p in POSITIONS), "existence": (("yes",), ("no",)),
}
_ATTRIBUTES = frozenset(SIZES) | frozenset(COLORS) | frozenset(SHAPES)


def _is_sentence(text: str) -> bool:
    stripped = text.strip()
    return stripped.endswith(".") and len(stripped.split()) >= 3


def _key(words: list[str], qtype: str) -> str | None:
    """The answer a normalised sentence gives for a `qtype` question, None if it names none."""
    if qtype == DESCRIBE:
        return " ".join(w for w in words if w in _ATTRIBUTES) or None
    if qtype == "count":
        numbers = ["0" if w == "no" else w for w in words if w.isdigit() or w == "no"]
        return numbers[-1] if numbers else None
    best: tuple[int, int] | None = None  # (end, length) of the last, then longest, match
    for phrase in _ANSWER_SETS.get(qtype, ()):
        for start in range(len(words) - len(phrase) + 1):
            if tuple(words[start:start + len(phrase)]) == phrase:
                best = max(best or (0, 0), (start + len(phrase), len(phrase)))
    return None if best is None else " ".join(words[best[0] - best[1]:best[0]])


def final_answer(text: str, qtype: str) -> str:
    """The normalised final answer of a model output or gold answer to a `qtype` question."""
    parts = _ANSWER_IS.split(text)
    if len(parts) > 1:
        return normalize_vqa_answer(parts[-1])
    norm = normalize_vqa_answer(text)
    if not _is_sentence(text):
        return norm
    return _key(norm.split(), qtype) or norm


def token_f1(prediction: str, gold: str) -> float:
    """SQuAD token F1 of two normalised answers, in [0, 1]; two empty answers score 1."""
    pred, ref = prediction.split(), gold.split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def score_shapes(questions: Sequence[EvalQuestion], answers: Sequence[Mapping], scoring: str = "llava") -> dict:
    """"score" = accuracy in percent over the non-description questions; "per_question_type"
    beside it (descriptions included, by exact match), and for descriptions
    "describe_exact_match" / "describe_token_f1" (percent) when the split holds any."""
    check_mode(scoring)
    m = align(questions, answers)
    types: dict[str, list[bool]] = defaultdict(list)
    f1s = []
    for q, out in zip(questions, m.outputs):
        qtype = q.meta["question_type"]
        pred, gold = final_answer(out or "", qtype), final_answer(q.answer, qtype)
        types[qtype].append(out is not None and pred == gold)
        if qtype == DESCRIBE:
            f1s.append(0.0 if out is None else token_f1(pred, gold))
    shared = [hit for qtype, hits in types.items() if qtype != DESCRIBE for hit in hits]
    acc = percent(sum(shared), len(shared))
    result = {"benchmark": "shapes", "scoring": scoring, "score": acc, "accuracy": acc,
              "per_question_type": {k: percent(sum(v), len(v)) for k, v in sorted(types.items())}}
    if f1s:
        result["describe_exact_match"] = result["per_question_type"][DESCRIBE]
        result["describe_token_f1"] = percent(sum(f1s), len(f1s))
    return {**result, **m.counts()}
