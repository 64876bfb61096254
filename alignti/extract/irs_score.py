"""IRS: how instruction-specific a layer's visual attention is (docs/method.md).

IRS(l) = 1 - mean_{i != j} cos(alpha_l(x_i), alpha_l(x_j)): a layer whose instruction-to-vision
attention looks the same for every sample (a fixed attention sink) scores near 0; a layer that
looks at different regions for different questions scores high.

With dynamic-resolution models (Qwen-VL) images of different sizes have different vision-token
grids, and a cosine between vectors over different grids compares unrelated positions; the mean
then runs over the ordered pairs (i, j), i != j, of samples whose images share a grid
(`irs_scores_by_grid`), each such pair counting once. With one grid this is the formula above.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def irs_scores(alphas: torch.Tensor) -> torch.Tensor:
    """alphas: [S, L, n_v] per sample and layer (any non-negative scale) -> fp64 [L] IRS scores."""
    return irs_scores_by_grid([alphas])


def irs_scores_by_grid(groups: Sequence[torch.Tensor]) -> torch.Tensor:
    """groups[g]: [S_g, L, n_g] alphas of the samples sharing grid g -> fp64 [L]: 1 - the mean cosine
    over all ordered same-grid pairs. ValueError unless some grid has two samples."""
    pairs = sum(g.shape[0] * (g.shape[0] - 1) for g in groups)
    if pairs == 0:
        raise ValueError("IRS needs at least two calibration samples with the same vision-token grid")
    off_diag = 0.0
    for g in groups:
        a = torch.nn.functional.normalize(g.double(), dim=-1)  # cosine = dot of unit vectors
        per_layer = a.transpose(0, 1)  # [L, S_g, n_g]
        gram = per_layer @ per_layer.transpose(1, 2)  # [L, S_g, S_g]
        off_diag = off_diag + gram.sum(dim=(1, 2)) - gram.diagonal(dim1=1, dim2=2).sum(-1)
    return 1.0 - off_diag / pairs


def choose_layer(scores: torch.Tensor) -> int:
    """l* = argmax IRS (first on ties)."""
    return int(torch.argmax(scores))
