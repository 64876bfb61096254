"""MME: per-subtask accuracy and accuracy+ summed into perception and cognition scores.

A subtask's score is acc + acc+ (each in percent, so at most 200): acc over its questions,
acc+ over its images (both of an image's two questions right). Perception sums the 10
perception subtasks (max 2000), cognition the 4 cognition ones (max 800). "score" is the
perception sum; "perception_percent" = perception / 20 is the 0-100 form some papers (the
Align-TI model zoo among them) print.

llava (MME's eval_tool/calculation.py, which LLaVA's mme.sh runs): lower-case the output; it is
"yes"/"no" when it equals one, else "yes" if "yes" occurs in its first 4 characters, else "no"
if "no" does, else "other" (wrong).
lmms-eval (tasks/mme/utils.py): the same after stripping and deleting every "."; in addition a
single "y"/"n" counts as yes/no.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence

from alignti.eval.formats import EvalQuestion
from alignti.eval.scoring.matching import align, check_mode, percent

PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork", "OCR")
COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")


def mme_parse(output: str, scoring: str = "llava") -> str:
    """"yes", "no" or "other"."""
    text = output.lower()
    if scoring == "lmms-eval":
        text = text.strip().replace(".", "")
        if len(text) == 1:
            return {"y": "yes", "n": "no"}.get(text, "other")
    if text in ("yes", "no"):
        return text
    head = text[:4]
    return "yes" if "yes" in head else "no" if "no" in head else "other"


def _subtask(rows: list[tuple[str, bool, str]]) -> dict:
    """rows = (image id, correct, parsed) for one subtask."""
    images: dict[str, list[bool]] = defaultdict(list)
    for image, hit, _ in rows:
        images[image].append(hit)
    acc = percent(sum(hit for _, hit, _ in rows), len(rows))
    acc_plus = percent(sum(all(h) for h in images.values()), len(images))
    return {"acc": acc, "acc_plus": acc_plus, "score": acc + acc_plus, "n_questions": len(rows),
            "n_images": len(images), "other": sum(p == "other" for _, _, p in rows)}


def score_mme(questions: Sequence[EvalQuestion], answers: Sequence[Mapping], scoring: str = "llava") -> dict:
    """Per subtask under "subtasks"; "perception", "cognition", "total"; "score" = perception."""
    check_mode(scoring)
    m = align(questions, answers)
    rows: dict[str, list[tuple[str, bool, str]]] = defaultdict(list)
    for q, out in zip(questions, m.outputs):
        parsed = mme_parse(out or "", scoring)
        # An image is its question_id (LLaVA: "<category>/<file>"), shared by its two questions.
        rows[q.meta["category"]].append((str(q.question_id), parsed == q.answer, parsed))
    subtasks = {name: _subtask(r) for name, r in sorted(rows.items())}
    perception = sum(v["score"] for k, v in subtasks.items() if k in PERCEPTION)
    cognition = sum(v["score"] for k, v in subtasks.items() if k in COGNITION)
    absent = [k for k in PERCEPTION + COGNITION if k not in subtasks]
    return {"benchmark": "mme", "scoring": scoring, "score": perception, "perception": perception,
            "cognition": cognition, "total": perception + cognition, "perception_percent": perception / 20,
            "subtasks": subtasks, "subtasks_absent": absent, **m.counts()}
