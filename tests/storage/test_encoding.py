"""Log-prob quantisation: the documented error bounds, checked against an independent reference."""

from __future__ import annotations

import math

import numpy as np

from alignti.storage.encoding import (
    decode_logprobs_abs, decode_logprobs_delta, encode_logprobs_abs, encode_logprobs_delta, tail_mass,
)
from alignti.storage.schema import LOGPROB_STEP as Q
from alignti.storage.synthetic import peaked_logprobs


def random_logprob_rows(rng: np.random.Generator, rows: int, k: int, vocab: int) -> np.ndarray:
    logits = rng.normal(scale=rng.uniform(0.5, 6.0, size=(rows, 1)), size=(rows, vocab))
    lp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    return -np.sort(-lp, axis=1)[:, :k].astype(np.float32)


def test_delta_codes_match_reference_and_bound():
    rng = np.random.default_rng(0)
    lp = np.concatenate([random_logprob_rows(rng, 200, 16, 300), peaked_logprobs(rng, 200, 16, 151_936)])
    codes = encode_logprobs_delta(lp)
    assert codes.dtype == np.uint16
    for row, crow in zip(lp[:20], codes[:20]):  # independent scalar reference
        n = [math.ceil(-float(x) / Q) for x in row]
        assert crow.tolist() == [n[0]] + [b - a for a, b in zip(n, n[1:])]
    back = decode_logprobs_delta(codes)
    err = lp.astype(np.float64) - back.astype(np.float64)
    assert back.dtype == np.float32 and err.min() >= 0 and err.max() < Q  # lp - q < lp_hat <= lp
    p, p_hat = np.exp(lp.astype(np.float64)), np.exp(back.astype(np.float64))
    assert (p_hat <= p).all() and ((p - p_hat) / p).max() < Q  # relative prob error < q ~ 0.1%
    r, r_hat = 1 - p.sum(1), 1 - p_hat.sum(1)
    assert (r_hat >= r - 1e-12).all()  # tail never shrinks, so never negative
    l1 = np.abs(p - p_hat).sum(1) + np.abs(r_hat - r)
    assert l1.max() < 2 * Q


def test_abs_codes_unsorted():
    rng = np.random.default_rng(1)
    lp = -rng.exponential(5.0, size=(100, 4)).astype(np.float32)
    back = decode_logprobs_abs(encode_logprobs_abs(lp))
    err = lp.astype(np.float64) - back
    assert err.min() >= 0 and err.max() < Q


def test_saturation_and_minus_inf():
    lp = np.array([[-0.01, -100.0, -100.5, -np.inf], [0.0, 0.0, -1e-9, -3.0]], dtype=np.float32)
    back = decode_logprobs_delta(encode_logprobs_delta(lp)).astype(np.float64)
    assert back[0, 0] <= lp[0, 0] and lp[0, 0] - back[0, 0] < Q
    # a step of more than 64 nats saturates: such probabilities (< e^-64) read back within 2e-28
    assert np.abs(np.exp(back[0, 1:]) - np.exp(lp[0, 1:].astype(np.float64))).max() < 2e-28
    assert (np.diff(back, axis=1) <= 0).all()  # still sorted
    assert back[1, 0] == 0.0 and back[1, 1] == 0.0 and lp[1, 2] - back[1, 2] < Q
    assert decode_logprobs_abs(encode_logprobs_abs(np.array([-np.inf, -70.0]))).min() >= -64.0


def test_tail_mass_clamped():
    lp = np.log(np.array([[0.7, 0.3], [0.5, 0.2]]))
    np.testing.assert_allclose(tail_mass(lp), [0.0, 0.3], atol=1e-6)
    assert (tail_mass(np.log(np.array([[0.7, 0.30001]]))) == 0).all()
