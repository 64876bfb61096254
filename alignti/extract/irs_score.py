"""IRS: how instruction-specific a layer's visual attention is (docs/method.md).

IRS(l) = 1 - mean_{i != j} cos(alpha_l(x_i), alpha_l(x_j)): a layer whose instruction-to-vision
attention looks the same for every sample (a fixed attention sink) scores near 0; a layer that
looks at different regions for different questions scores high.
"""

from __future__ import annotations

import torch


def irs_scores(alphas: torch.Tensor) -> torch.Tensor:
    """alphas: [S, L, n_v] per sample and layer (any non-negative scale) -> fp64 [L] IRS scores."""
    s = alphas.shape[0]
    if s < 2:
        raise ValueError("IRS needs at least two calibration samples")
    a = torch.nn.functional.normalize(alphas.double(), dim=-1)  # cosine = dot of unit vectors
    per_layer = a.transpose(0, 1)  # [L, S, n_v]
    gram = per_layer @ per_layer.transpose(1, 2)  # [L, S, S]
    off_diag = gram.sum(dim=(1, 2)) - gram.diagonal(dim1=1, dim2=2).sum(-1)
    return 1.0 - off_diag / (s * (s - 1))


def choose_layer(scores: torch.Tensor) -> int:
    """l* = argmax IRS (first on ties)."""
    return int(torch.argmax(scores))
