"""Shared helpers for the cache tests (also imported by the crash_writer subprocess)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from alignti.storage.schema import FINGERPRINT_KEYS, CacheManifest, CacheSettings, SampleSignals
from alignti.storage.synthetic import synthetic_sample

VOCAB = 500
SETTINGS = CacheSettings(top_k=8, tpa_d=2, tpa_top_k=4, iva_max_positions=6, iva_top_k=4, seed=3)


def fingerprint(**over: str | int) -> dict[str, str | int]:
    fp: dict[str, str | int] = {k: f"{k}-hash-0" for k in FINGERPRINT_KEYS}
    fp.update(vocab_size=VOCAB, num_hidden_layers=4)
    fp.update(over)
    return fp


def manifest(settings: CacheSettings = SETTINGS, **fp_over: str | int) -> CacheManifest:
    return CacheManifest.create(fingerprint(**fp_over), settings)


def make_samples(n: int, seed: int = 0, settings: CacheSettings = SETTINGS) -> list[SampleSignals]:
    """Deterministic varied samples: text-only ones, zero response tokens, TPA on a subset."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        n_v = 0 if i % 5 == 3 else int(rng.choice([4, 16]))
        n_resp = 0 if i % 11 == 7 else int(rng.integers(1, 12))
        s = synthetic_sample(rng, settings, vocab=VOCAB, n_resp=n_resp, n_v=n_v, n_text=int(rng.integers(3, 15)),
                             sample_id=f"{seed:04x}{i:028x}")
        out.append(s)
    return out


def tree_snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """{relative path: (size, mtime_ns)} of every file and dir under root."""
    snap = {}
    for dirpath, dirs, files in os.walk(root):
        for n in dirs + files:
            p = Path(dirpath) / n
            st = p.stat()
            snap[str(p.relative_to(root))] = (st.st_size if p.is_file() else 0, st.st_mtime_ns)
    return snap


def assert_same_signals(a: SampleSignals, b: SampleSignals, exact_logprobs: bool = False) -> None:
    """b (read back) equals a (written) exactly, log-probs within the documented quantisation bound."""
    from alignti.storage.schema import LOGPROB_STEP

    for f in ("sample_id", "source_id", "image_path", "image_sha256", "n_v", "vision_start"):
        assert getattr(a, f) == getattr(b, f), f
    for f in ("text_ids", "label_spans", "resp_positions", "topk_ids", "tpa_rows", "tpa_cand_ids", "tpa_topk_ids",
              "iva_positions", "iva_topk_ids"):
        x, y = getattr(a, f), getattr(b, f)
        assert y.dtype == np.int32, f
        assert x.shape == y.shape and np.array_equal(x, y), f
    for f in ("topk_logprobs", "tpa_cand_logprobs", "tpa_topk_logprobs", "iva_topk_logprobs"):
        x, y = getattr(a, f).astype(np.float64), getattr(b, f)
        assert y.dtype == np.float32 and x.shape == y.shape, f
        if exact_logprobs:
            assert np.array_equal(getattr(a, f), y), f
        else:  # documented bound: lp - q < lp_hat <= lp (rounding toward -inf)
            err = x - y.astype(np.float64)
            assert err.size == 0 or (err.min() >= 0 and err.max() < LOGPROB_STEP), (f, err.min(), err.max())
    assert b.saliency.dtype == np.float32 and a.saliency.shape == b.saliency.shape
    np.testing.assert_array_equal(b.saliency, a.saliency.astype(np.float16).astype(np.float32))
