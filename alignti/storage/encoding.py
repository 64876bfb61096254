"""Log-prob quantisation: float32 log-probs <-> uint16 codes on a grid of LOGPROB_STEP nats.

Why: fp16 log-probs cost ~72 B per k=64 row after compression; integer codes of sorted rows,
delta-coded, cost ~65 B at a finer effective precision (bench/cache_size.py, docs/cache-format.md).

Rounding is toward -inf: code n = ceil(-lp / q), decoded lp^ = -n q, so lp - q < lp^ <= lp and
every decoded probability satisfies p e^{-q} < p^ <= p. Hence the derived tail mass
r^ = 1 - sum p^ is never below the true r (never negative), and the (k+1)-bucket distribution
moves by less than 2q (~0.002) in L1. Codes saturate at 65535 (~64 nats): only probabilities
below e^-64 ~ 1.6e-28 are affected.

- "logprob_delta" (rows sorted descending along the last axis): c[..., 0] = n[..., 0],
  c[..., i] = n[..., i] - n[..., i-1] >= 0. Decode: lp = -cumsum(c, -1) * q.
- "logprob_abs" (no order): c = n. Decode: lp = -c * q.
"""

from __future__ import annotations

import numpy as np

from alignti.storage.schema import LOGPROB_STEP

_MAX_CODE = np.iinfo(np.uint16).max


def _codes(logprobs: np.ndarray, step: float) -> np.ndarray:
    """int64 codes n = ceil(-lp / step) >= 0; -inf saturates."""
    lp = np.asarray(logprobs, dtype=np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        n = np.ceil(np.minimum(-lp, _MAX_CODE * step * 1024) / step)
    return np.maximum(n, 0).astype(np.int64)


def encode_logprobs_delta(logprobs: np.ndarray, step: float = LOGPROB_STEP) -> np.ndarray:
    """float [..., k] sorted descending -> uint16 [..., k] delta codes."""
    n = _codes(logprobs, step)
    if n.shape[-1] == 0:
        return n.astype(np.uint16)
    d = np.diff(n, axis=-1, prepend=0)
    return np.minimum(d, _MAX_CODE).astype(np.uint16)


def decode_logprobs_delta(codes: np.ndarray, step: float = LOGPROB_STEP) -> np.ndarray:
    """uint16 [..., k] delta codes -> float32 [..., k] log-probs (descending)."""
    n = np.cumsum(codes.astype(np.int64), axis=-1)
    # n * step is exact in float32 while n < 2^24 (k * 65535 < 2^24 for k <= 256).
    return (-(n.astype(np.float64) * step)).astype(np.float32)


def encode_logprobs_abs(logprobs: np.ndarray, step: float = LOGPROB_STEP) -> np.ndarray:
    """float [...] log-probs -> uint16 [...] absolute codes."""
    return np.minimum(_codes(logprobs, step), _MAX_CODE).astype(np.uint16)


def decode_logprobs_abs(codes: np.ndarray, step: float = LOGPROB_STEP) -> np.ndarray:
    """uint16 [...] absolute codes -> float32 [...] log-probs."""
    return (-(codes.astype(np.float64) * step)).astype(np.float32)


def quantise_logprobs(logprobs: np.ndarray, step: float = LOGPROB_STEP) -> np.ndarray:
    """The value a log-prob reads back as (float32), for tests and error reports."""
    n = np.minimum(_codes(logprobs, step), _MAX_CODE)
    return (-(n.astype(np.float64) * step)).astype(np.float32)


def tail_mass(topk_logprobs: np.ndarray) -> np.ndarray:
    """float32 [...] teacher tail mass r = 1 - sum_i p_i over the last axis, clamped to [0, 1]."""
    s = np.exp(topk_logprobs.astype(np.float64)).sum(axis=-1)
    return np.clip(1.0 - s, 0.0, 1.0).astype(np.float32)
