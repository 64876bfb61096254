"""Realistic synthetic teacher signals, for the cache tests, bench/cache_size.py and the docs.

Token ids: each top-k row is k distinct ids drawn without replacement from a Zipf(1) law over
the vocabulary (BPE ids are roughly ordered by frequency), in draw order, so frequent ids tend
to get the higher probabilities.
Log-probs: a peaked softmax. The k largest logits of V i.i.d. Gumbel(scale sigma) variables are
sigma * (log V - log Gamma_i) (Gamma_i = sum of i Exp(1)), sigma ~ U(1, 2); the top logit gets an
extra Exp(3) "confidence" boost; the tail's partition mass is the analytic sum over i > k. With
these settings the mean top-1 probability is ~0.78 and the mean top-64 mass ~0.94.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from alignti.storage.schema import CacheSettings, SampleSignals

QWEN_VOCAB = 151_936


@lru_cache(maxsize=4)
def _zipf_cdf(vocab: int, exponent: float) -> np.ndarray:
    w = np.arange(1, vocab + 1, dtype=np.float64) ** -exponent
    cdf = np.cumsum(w)
    return cdf / cdf[-1]


def zipf_ids(rng: np.random.Generator, rows: int, k: int, vocab: int, exponent: float = 1.0) -> np.ndarray:
    """int32 [rows, k]: k distinct Zipf-distributed ids per row, in draw order."""
    if k > vocab:
        raise ValueError(f"k={k} > vocab={vocab}")
    cdf = _zipf_cdf(vocab, exponent)
    out = np.empty((rows, k), dtype=np.int32)
    for i in range(rows):
        got = np.zeros(0, dtype=np.int64)
        while got.size < k:
            draw = np.concatenate([got, np.searchsorted(cdf, rng.random(4 * k + 8))])
            _, first = np.unique(draw, return_index=True)
            got = draw[np.sort(first)]
        out[i] = got[:k]
    return np.minimum(out, vocab - 1)


def peaked_logprobs(rng: np.random.Generator, rows: int, k: int, vocab: int) -> np.ndarray:
    """float32 [rows, k] top-k log-probs of a peaked softmax over `vocab`, descending."""
    sigma = rng.uniform(1.0, 2.0, size=rows)
    gam = np.cumsum(rng.exponential(size=(rows, k)), axis=1)
    z = sigma[:, None] * (np.log(vocab) - np.log(gam))
    z[:, 0] += rng.exponential(3.0, size=rows)
    z = -np.sort(-z, axis=1)
    a = k + 0.5  # tail: sum_{i>k} (V/i)^sigma ~ V^sigma * int_a^V x^-sigma dx
    with np.errstate(divide="ignore", invalid="ignore"):
        integ = np.where(np.abs(sigma - 1) < 1e-9, np.log(vocab / a),
                         (vocab ** (1 - sigma) - a ** (1 - sigma)) / (1 - sigma))
    log_tail = np.where(vocab > k, sigma * np.log(vocab) + np.log(np.maximum(integ, 1e-300)), -np.inf)
    m = z[:, 0]
    lse = np.logaddexp(np.log(np.exp(z - m[:, None]).sum(axis=1)) + m, log_tail)
    return (z - lse[:, None]).astype(np.float32)


def synthetic_sample(rng: np.random.Generator, settings: CacheSettings, *, vocab: int = QWEN_VOCAB,
                     n_resp: int = 60, n_v: int = 576, n_text: int = 80, sample_id: str | None = None) -> SampleSignals:
    """One sample with every signal filled as extract would (n_v=0: text-only, no IVA)."""
    k, d, kt, kv = settings.top_k, settings.tpa_d, settings.tpa_top_k, settings.iva_top_k
    vision_start = 5 if n_v else -1
    text_ids = zipf_ids(rng, 1, n_text + n_resp, vocab)[0]
    length = n_text + n_resp + max(n_v - 1, 0)  # expanded length: the image token becomes n_v tokens
    first_resp = length - n_resp
    resp = np.arange(first_resp - 1, length - 1, dtype=np.int32)
    topk_ids = zipf_ids(rng, n_resp, k, vocab)
    topk_lp = peaked_logprobs(rng, n_resp, k, vocab)
    n_c = n_resp if settings.tpa_max_positions is None else min(n_resp, settings.tpa_max_positions)
    tpa_rows = np.sort(rng.choice(n_resp, size=n_c, replace=False)).astype(np.int32)
    cand = np.arange(1, d + 1) if d < k else np.arange(d) % k
    tpa_cand_ids = topk_ids[tpa_rows][:, cand]
    tpa_cand_lp = topk_lp[tpa_rows][:, cand]
    tpa_topk_ids = zipf_ids(rng, n_c * d, kt, vocab).reshape(n_c, d, kt)
    tpa_topk_lp = peaked_logprobs(rng, n_c * d, kt, vocab).reshape(n_c, d, kt)
    if n_v and settings.iva_max_positions:
        sal = rng.gamma(0.3, size=n_v)
        sal = (sal / sal.sum()).astype(np.float32)
        pos = np.argsort(-sal, kind="stable")[:min(settings.iva_max_positions, n_v)].astype(np.int32)
    else:
        sal, pos = np.zeros(0, np.float32), np.zeros(0, np.int32)
    sid = sample_id if sample_id is not None else rng.bytes(16).hex()
    return SampleSignals(
        sample_id=sid, source_id=f"src-{sid[:8]}", image_path=f"img/{sid[:6]}.jpg" if n_v else "",
        image_sha256=rng.bytes(32).hex() if n_v else "", text_ids=text_ids,
        label_spans=np.array([[first_resp, length]] if n_resp else [], dtype=np.int32).reshape(-1, 2),
        n_v=n_v, vision_start=vision_start,
        resp_positions=resp, topk_ids=topk_ids, topk_logprobs=topk_lp, tpa_rows=tpa_rows,
        tpa_cand_ids=tpa_cand_ids, tpa_cand_logprobs=tpa_cand_lp, tpa_topk_ids=tpa_topk_ids,
        tpa_topk_logprobs=tpa_topk_lp, saliency=sal, iva_positions=pos,
        iva_topk_ids=zipf_ids(rng, pos.size, kv, vocab), iva_topk_logprobs=peaked_logprobs(rng, pos.size, kv, vocab))
