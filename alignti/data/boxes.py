"""Object boxes on the vision-token grid: how much of each patch a box covers.

Used wherever corpus box annotations meet the n_v vision tokens (a square grid of patches,
row-major, as SigLIP emits them): the demo's vision-tower labels, the saliency metrics, and the
grounding target of `distill --ground-weight`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

Box = tuple[float, float, float, float]  # x0, y0, x1, y1 in original image pixels


def patch_overlap(grid: int, size: tuple[int, int], box: Box) -> np.ndarray:
    """float64 [grid*grid]: fraction of each patch's area inside `box` (the image is resized to the grid)."""
    w, h = size
    x0, y0, x1, y1 = box[0] / w * grid, box[1] / h * grid, box[2] / w * grid, box[3] / h * grid
    edges = np.arange(grid + 1, dtype=np.float64)
    ox = np.clip(np.minimum(edges[1:], x1) - np.maximum(edges[:-1], x0), 0, 1)  # [grid] columns
    oy = np.clip(np.minimum(edges[1:], y1) - np.maximum(edges[:-1], y0), 0, 1)  # [grid] rows
    return np.outer(oy, ox).reshape(-1)


def boxes_distribution(n_v: int, size: tuple[int, int], boxes: Sequence[Sequence[float]]) -> np.ndarray | None:
    """float32 [n_v] summing to 1: the boxes' covered area per patch, each box weighted equally.

    None when there is no box, the grid is not square, or the boxes cover no patch.
    """
    grid = int(round(math.sqrt(n_v)))
    if not boxes or grid * grid != n_v:
        return None
    total = np.zeros(n_v, dtype=np.float64)
    for box in boxes:
        cover = patch_overlap(grid, size, tuple(float(v) for v in box))
        if cover.sum() > 0:
            total += cover / cover.sum()
    s = total.sum()
    return (total / s).astype(np.float32) if s > 0 else None
