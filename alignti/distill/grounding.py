"""The grounding target: where a sample's questions point, from the corpus's object boxes.

`distill --ground-weight W` adds `W * KL(g || alpha_l)`, with `alpha_l` the model's own
instruction-to-vision attention at `--ground-layer` (the probe IVA uses, so exactly the
quantity extraction caches as saliency) and `g` the share of each vision patch covered by the
boxes of the objects the questions are about. It is a teacher-training aid: a large pretrained
VLM already attends to the object an instruction names (the premise of IVA), a from-scratch
model on a small corpus does not (docs/results.md), and this term supplies that behaviour from
box annotations, as grounding data does for real VLMs.

Annotations (what `alignti data shapes` writes): a row's `qa` list with one entry per question,
each with `relevant_boxes` ([[x0, y0, x1, y1], ...] in original image pixels), or a top-level
`relevant_boxes` for a single-question row. Every question needs at least one box (a "no"
answer points nowhere): otherwise the row has no target and adds nothing.
"""

from __future__ import annotations

import numpy as np

from alignti.data.boxes import boxes_distribution
from alignti.data.encode import EncodedSample

BOXES_FIELD = "relevant_boxes"
TURNS_FIELD = "qa"


def question_boxes(extra: dict) -> list[list] | None:
    """Per-question box lists from a corpus row's extra fields, or None without annotations."""
    turns = extra.get(TURNS_FIELD)
    if isinstance(turns, list) and turns and all(isinstance(t, dict) and BOXES_FIELD in t for t in turns):
        return [list(t[BOXES_FIELD] or []) for t in turns]
    if BOXES_FIELD in extra:
        return [list(extra[BOXES_FIELD] or [])]
    return None


def grounding_target(sample: EncodedSample) -> np.ndarray | None:
    """float32 [n_v] summing to 1 (questions weighted equally), or None when the sample has none.

    None for text-only samples, rows without box annotations, rows where a question has no box,
    and non-square vision grids.
    """
    if sample.n_v == 0 or sample.image_size is None:
        return None
    per_question = question_boxes(sample.extra)
    if not per_question or any(not boxes for boxes in per_question):
        return None
    dists = [boxes_distribution(sample.n_v, sample.image_size, boxes) for boxes in per_question]
    if any(d is None for d in dists):
        return None
    mean = np.mean(np.stack(dists), axis=0)
    return (mean / mean.sum()).astype(np.float32)
