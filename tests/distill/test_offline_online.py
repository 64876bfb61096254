"""Offline equals online: loss terms from the written-and-read cache equal those from the teacher's
in-memory `HfTeacher` output, ids exactly and losses within the storage rounding.

The world (tokenizer, teacher, student, shapes corpus, cache) is `worlds.SignalWorld`.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from alignti.data.corpus import read_corpus
from alignti.distill.batches import build_distill_batch
from alignti.distill.config import LossConfig
from alignti.distill.examples import DistillExample, cache_examples, verify_alignment
from alignti.models.probe import l1_normalize, probe_attention
from alignti.storage.encoding import quantise_logprobs
from alignti.storage.reader import CacheReader
from alignti.storage.schema import LOGPROB_STEP, SampleSignals
from tests.distill.worlds import SignalWorld, make_signal_world, objective_terms

TEACHER_LPS = ("topk_logprobs", "tpa_cand_logprobs", "tpa_topk_logprobs", "iva_topk_logprobs")


def online_examples(world: SignalWorld, signals: list[SampleSignals]) -> list[DistillExample]:
    """Student encodings joined to in-memory signals by sample id (the cache never involved)."""
    enc = world.student_encoder(world.image_root)
    by_id = {s.sample_id: s for s in signals}
    out = []
    for row in read_corpus(world.data):
        sample = enc.encode(row)
        verify_alignment(sample, by_id[sample.sample_id])
        out.append(DistillExample(sample, by_id[sample.sample_id]))
    return out


def storage_rounded(sig: SampleSignals) -> SampleSignals:
    """What the cache's encoding does to a sample: log-probs to the LOGPROB_STEP grid, saliency to fp16."""
    lps = {name: quantise_logprobs(getattr(sig, name)) for name in TEACHER_LPS}
    return dataclasses.replace(sig, saliency=sig.saliency.astype(np.float16).astype(np.float32), **lps)


# ---- float64 reference of the quantisation error bound --------------------------------------

def bucket_kl_and_bound(student_logits: torch.Tensor, ids: torch.Tensor, lps: torch.Tensor) -> tuple:
    """Per row (float64): KL_k(teacher || student) with the tail bucket, and a bound on how much it
    moves when the teacher log-probs are rounded down by less than q = LOGPROB_STEP.

    With p^_i = p_i e^{-delta_i}, 0 <= delta_i < q: |p^_i - p_i| <= q p_i and the tail
    r^ = 1 - sum p^ lies in [r, r + q (1 - r)]. KL = sum_b g(p_b) - sum_b p_b log q_b with
    g(x) = x log x, |g'(x)| = |1 + log x|, so
      |dKL| <= q [ sum_i p_i (1 + |log p_i| + |log q_i|) + (1 - r)(1 + |log r| + |log s|) + q ].
    """
    q = LOGPROB_STEP
    lq_all = torch.log_softmax(student_logits.double(), -1)
    lq = lq_all.gather(1, ids)
    p = lps.double().exp()
    r = (1 - p.sum(-1)).clamp_min(1e-300)
    s = (1 - lq.exp().sum(-1)).clamp_min(1e-300)
    kl = (p * (lps.double() - lq)).sum(-1) + r * (r.log() - s.log())
    bound = q * ((p * (1 + lps.double().abs() + lq.abs())).sum(-1) + (1 - r) * (1 + r.log().abs() + s.log().abs()) + q)
    return kl, bound


def student_rows(model, batch, rows: torch.Tensor) -> torch.Tensor:
    """Student logits [n, V] at flat rows of a batch, from a separate no-grad forward."""
    with torch.no_grad():
        kw = {"position_ids": batch.position_ids} if batch.position_ids is not None else {}
        hidden = model.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                             **batch.images, **kw)[0]
        return model.get_output_embeddings()(hidden.reshape(-1, hidden.shape[-1])[rows])


def student_attention(model, batch, layer: int) -> torch.Tensor:
    """The student's instruction-to-vision attention [S, n_v] of the samples with saliency (probe, no grad)."""
    with probe_attention(model, [layer], list(batch.attn_queries), list(batch.attn_keys)) as probe:
        student_rows(model, batch, batch.resp_rows[:1])
    return l1_normalize(probe.result()[layer][batch.attn_sample].double())


def tolerances(world: SignalWorld, batch, iva_target: str) -> dict[str, float]:
    """Derived bound per term on |offline - online| (sums), from the raw in-memory teacher values.

    fp16 saliency: each w moves by <= 2^-11 relatively, so w~ = w / sum w moves by <= ~2^-10
    (factor 1.01 for the second order). Quantised candidate log-probs move each u by a factor
    in (e^-q, e^q). For the attention target, KL(w || a) = sum g(w) - w log a moves by
    <= 1.01 * 2^-10 * sum_v w_v (1 + |log w_v| + |log a_v|).
    """
    q, eps_w = LOGPROB_STEP, 1.01 * 2.0**-10
    kl_kd, b_kd = bucket_kl_and_bound(student_rows(world.student, batch, batch.resp_rows), batch.kd_ids,
                                      batch.kd_logprobs)
    kl_t, b_t = bucket_kl_and_bound(student_rows(world.student, batch, batch.tpa_rows), batch.tpa_ids,
                                    batch.tpa_logprobs)
    u = torch.softmax(batch.tpa_cand_logprobs.double(), -1).reshape(-1)
    out = {"sft": 0.0, "kd": float(b_kd.sum()), "tpa": float((u * b_t).sum() + math.expm1(q) * (u * kl_t).sum())}
    if iva_target == "attention":
        w = l1_normalize(batch.attn_saliency.double())
        a = student_attention(world.student, batch, 1).clamp_min(1e-8)
        out["iva"] = float(eps_w * (w * (1 + w.log().abs() + a.log().abs())).sum())
        return out
    kl_v, b_v = bucket_kl_and_bound(student_rows(world.student, batch, batch.iva_rows), batch.iva_ids,
                                    batch.iva_logprobs)
    w = batch.iva_weights.double()
    w_tilde = w / torch.zeros(batch.num_samples, dtype=torch.float64).index_add_(0, batch.iva_sample, w)[batch.iva_sample]
    out["iva"] = float((w_tilde * b_v).sum() + eps_w * (w_tilde * kl_v).sum())
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_signal_world(tmp_path_factory.mktemp("world"))


def _batch(world, examples, cfg):
    return build_distill_batch(examples, world.pad_id, world.image_token_id, cfg, "cpu", torch.float32)


def _values(terms):
    return {k: (float(s.detach()), float(c)) for k, (s, c) in terms.items()}


@pytest.mark.parametrize("iva_target", ["logits", "attention"])
def test_cache_equals_in_memory_signals(world, iva_target):
    cfg = LossConfig("alignti", iva_target=iva_target, chunk_size=7)
    offline, rejects = cache_examples(CacheReader.open(world.cache), world.student_encoder(), None)
    assert rejects == [] and len(offline) == len(world.signals)
    online = online_examples(world, world.signals)
    rounded = online_examples(world, [storage_rounded(s) for s in world.signals])
    order = {e.student.sample_id: i for i, e in enumerate(online)}
    offline = sorted(offline, key=lambda e: order[e.student.sample_id])  # corpus order either way; make it explicit
    b_off, b_on, b_rnd = (_batch(world, ex, cfg) for ex in (offline, online, rounded))
    assert b_off.is_ribbon
    # ids exact: model inputs (ground truth + candidates), every row index and every teacher id
    for name in ("input_ids", "position_ids", "attention_mask", "resp_rows", "resp_targets", "kd_ids", "iva_rows",
                 "iva_ids", "iva_sample", "tpa_rows", "tpa_ids", "attn_sample"):
        assert torch.equal(getattr(b_off, name), getattr(b_on, name)), name
    # the cache returns exactly the storage-rounded values, so those losses agree to fp32 rounding
    rounded_fields = ("kd_logprobs", "tpa_logprobs", "tpa_cand_logprobs") + (
        ("attn_saliency",) if iva_target == "attention" else ("iva_logprobs", "iva_weights"))
    for name in rounded_fields:
        assert torch.equal(getattr(b_off, name), getattr(b_rnd, name)), name
        assert not torch.equal(getattr(b_off, name), getattr(b_on, name)), name  # the rounding is real
    t_off, t_on, t_rnd = (_values(objective_terms(world.student, b, cfg)) for b in (b_off, b_on, b_rnd))
    assert t_off == t_rnd
    assert set(t_off) == {"sft", "kd", "iva", "tpa"}
    tol = tolerances(world, b_on, iva_target)
    for name, (s_off, c_off) in t_off.items():
        s_on, c_on = t_on[name]
        assert c_off == c_on == b_off.counts()[name] > 0
        assert abs(s_off - s_on) <= tol[name] + 1e-5 * max(1.0, abs(s_on)), (name, s_off, s_on, tol[name])
    assert tol["kd"] > 0 and tol["kd"] < 0.05 * t_on["kd"][0]  # the bound is informative, not vacuous
