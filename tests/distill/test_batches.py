"""Batches and loss terms against brute force: separate plain float64 forwards per sample and per
TPA candidate, with the teacher rows read back from the cache. Plus the join's refusals."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from alignti.data.encode import SampleEncoder
from alignti.distill.batches import build_distill_batch
from alignti.distill.config import LossConfig
from alignti.distill.examples import cache_examples, check_iva_compatible, corpus_examples
from alignti.distill.losses import combine
from alignti.distill.objective import padded_mass_warning, student_iva_layer
from alignti.errors import AlignTIError
from alignti.models.llava import TinySpec, build_tiny_llava
from alignti.models.tokenizer import train_tokenizer
from alignti.storage.reader import CacheReader
from tests.distill.test_offline_online import bucket_kl_and_bound
from tests.distill.worlds import make_signal_world, objective_terms, student_model
from tests.helpers.families import reference_logprobs
from tests.helpers.models import pixels

REF_RTOL = 2e-5  # fp32 step vs float64 reference


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_signal_world(tmp_path_factory.mktemp("world"))


@pytest.fixture(scope="module")
def examples(world):
    ex, rejects = cache_examples(CacheReader.open(world.cache), world.student_encoder(), None)
    assert rejects == [] and len(ex) == 6
    return list(ex)


def _batch(world, ex, cfg, **kw):
    return build_distill_batch(ex, world.pad_id, world.image_token_id, cfg, "cpu", torch.float32, **kw)


def brute_force(model, examples, weighting: str = "teacher") -> dict[str, tuple[float, float]]:
    """(sum, count) of each term from separate plain forwards (per sample, per candidate), each with the
    positions the model computes itself (any family)."""
    out = {k: [0.0, 0] for k in ("sft", "kd", "iva", "tpa")}
    for e in examples:
        s, sig = e.student, e.signals
        lp = reference_logprobs(model, s.input_ids, s.images)
        resp = s.resp_positions
        out["sft"][0] -= float(lp[resp, s.input_ids[resp + 1]].sum())
        out["sft"][1] += resp.numel()
        kl, _ = bucket_kl_and_bound(lp[resp], torch.from_numpy(sig.topk_ids).long(), torch.from_numpy(sig.topk_logprobs))
        out["kd"][0] += float(kl.sum())
        out["kd"][1] += resp.numel()
        if sig.iva_positions.size:
            pos = torch.from_numpy(sig.iva_positions).long()
            kl, _ = bucket_kl_and_bound(lp[s.vision_start + pos], torch.from_numpy(sig.iva_topk_ids).long(),
                                        torch.from_numpy(sig.iva_topk_logprobs))
            w = torch.from_numpy(sig.saliency[sig.iva_positions]).double()
            out["iva"][0] += float((w / w.sum() * kl).sum())
            out["iva"][1] += 1
        for r, cands, cand_lp, ids, lps in zip(sig.tpa_rows, sig.tpa_cand_ids, sig.tpa_cand_logprobs,
                                               sig.tpa_topk_ids, sig.tpa_topk_logprobs):
            t = int(resp[r])
            rows = torch.stack([reference_logprobs(model, torch.cat([s.input_ids[: t + 1], torch.tensor([int(a)])]),
                                                   s.images)[-1] for a in cands])
            kl, _ = bucket_kl_and_bound(rows, torch.from_numpy(ids).long(), torch.from_numpy(lps))
            if weighting == "uniform":
                u = 1 / len(cands)
            else:  # the proposer's p(a | x_<=t) over the candidates, renormalised
                u = torch.from_numpy(cand_lp).double().exp() if weighting == "teacher" else lp[t, cands].exp()
                u = u / u.sum()
            out["tpa"][0] += float((u * kl).sum())
            out["tpa"][1] += 1
    return {k: (v[0], float(v[1])) for k, v in out.items()}


def _values(terms):
    return {k: (float(s.detach()), float(c)) for k, (s, c) in terms.items()}


@pytest.mark.parametrize("weighting", ["teacher", "uniform", "student"])
def test_terms_equal_brute_force_from_the_cache(world, examples, weighting):
    cfg = LossConfig("alignti", tpa_weighting=weighting, chunk_size=5)
    batch = _batch(world, examples, cfg)
    assert batch.is_ribbon and batch.attention_mask.dim() == 4
    got = _values(objective_terms(world.student, batch, cfg))
    ref = brute_force(world.student, examples, weighting)
    assert ref["tpa"][1] > 10 and ref["iva"][1] == 6  # every term has data
    for name in ("sft", "kd", "iva", "tpa"):
        assert got[name][1] == ref[name][1] == batch.counts()[name], name
        assert got[name][0] == pytest.approx(ref[name][0], rel=REF_RTOL), name


def test_plain_and_ribbon_layouts_agree(world, examples):
    """Ground-truth rows of the ribbon equal the plain batch's (TPA weight 0 -> plain padding)."""
    for target in ("logits", "attention"):
        with_tpa = LossConfig("alignti", iva_target=target)
        without = LossConfig("alignti", iva_target=target, tpa_weight=0.0)
        b_r, b_p = _batch(world, examples, with_tpa), _batch(world, examples, without)
        assert b_r.is_ribbon and not b_p.is_ribbon and b_p.attention_mask.dim() == 2
        t_r = _values(objective_terms(world.student, b_r, with_tpa))
        t_p = _values(objective_terms(world.student, b_p, without))
        assert set(t_p) == {"sft", "kd", "iva"}
        for name in t_p:
            assert t_r[name][1] == t_p[name][1]
            assert t_r[name][0] == pytest.approx(t_p[name][0], rel=1e-5), (target, name)


def test_attention_target_equals_eager_attention(world, examples):
    cfg = LossConfig("alignti", iva_target="attention", tpa_weight=0.0)
    batch = _batch(world, examples, cfg)
    got = _values(objective_terms(world.student, batch, cfg))["iva"]
    model = world.student
    model.set_attn_implementation({"text_config": "eager"})
    try:
        total = 0.0
        for b, e in enumerate(examples):
            s = e.student
            with torch.no_grad():
                att = model(input_ids=s.input_ids[None], pixel_values=pixels(s),
                            output_attentions=True).attentions[1][0].double().mean(0)  # [T, T], layer 1
            a = att[s.instruction_positions][:, s.vision_positions].mean(0)
            a = (a / a.sum()).clamp_min(1e-8)
            w = torch.from_numpy(e.signals.saliency).double()
            w = w / w.sum()
            total += float((w * (w.log() - a.log())).sum())
    finally:
        model.set_attn_implementation({"text_config": "sdpa"})
    assert got[1] == 6.0
    assert got[0] == pytest.approx(total, rel=1e-4)


def test_default_student_iva_layer():
    assert student_iva_layer(1, 2, 2) == 1
    assert student_iva_layer(12, 28, 24) == 10  # round(12 * 23 / 27) = round(10.2)
    assert student_iva_layer(27, 28, 24) == 23 and student_iva_layer(0, 28, 24) == 0
    assert student_iva_layer(0, 1, 4) == 0


def test_all_zero_terms_give_zero_and_no_nan(world, examples):
    """A batch with no IVA and no TPA rows: weighted terms are (0, 0), gradients finite."""
    def strip(sig):
        d, kt, kv = sig.tpa_cand_ids.shape[1], sig.tpa_topk_ids.shape[2], sig.iva_topk_ids.shape[1]
        return dataclasses.replace(
            sig, tpa_rows=np.zeros(0, np.int32), tpa_cand_ids=np.zeros((0, d), np.int32),
            tpa_cand_logprobs=np.zeros((0, d), np.float32), tpa_topk_ids=np.zeros((0, d, kt), np.int32),
            tpa_topk_logprobs=np.zeros((0, d, kt), np.float32), saliency=np.zeros(0, np.float32),
            iva_positions=np.zeros(0, np.int32), iva_topk_ids=np.zeros((0, kv), np.int32),
            iva_topk_logprobs=np.zeros((0, kv), np.float32))

    bare = [dataclasses.replace(e, signals=strip(e.signals)) for e in examples[:2]]
    for target in ("logits", "attention"):
        cfg = LossConfig("alignti", iva_target=target)
        batch = _batch(world, bare, cfg)
        assert not batch.is_ribbon
        assert batch.counts()["iva"] == 0 and batch.counts()["tpa"] == 0 and batch.counts()["kd"] > 0
        world.student.zero_grad()
        terms = objective_terms(world.student, batch, cfg)
        for name in ("iva", "tpa"):
            assert float(terms[name][0].detach()) == 0.0 and float(terms[name][1]) == 0.0
        total, means = combine(terms, cfg.weights(), batch.counts())
        total.backward()
        assert torch.isfinite(total) and all(torch.isfinite(m) for m in means.values())
        grads = [p.grad for p in world.student.parameters() if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads)
    world.student.zero_grad()


def test_student_with_another_vision_grid(world, examples):
    """n_v 4 instead of 16: KD/TPA rows still line up (positions after the image shift); IVA refused."""
    student, processor = student_model(TinySpec(text_family="qwen3", patch=16, seed=2))
    enc = SampleEncoder(processor, None, 512)
    ex, _ = cache_examples(CacheReader.open(world.cache), enc, None)
    assert ex[0].student.n_v == 4 and ex[0].signals.n_v == 16
    cfg = LossConfig("alignti", iva_weight=0.0)
    batch = _batch(world, ex, cfg)
    got = _values(objective_terms(student, batch, cfg))
    ref = brute_force(student, ex)
    for name in ("sft", "kd", "tpa"):
        assert got[name][1] == ref[name][1]
        assert got[name][0] == pytest.approx(ref[name][0], rel=REF_RTOL), name
    with pytest.raises(AlignTIError, match=r"vision-token count to equal the teacher's: sample [0-9a-f]{32} \(source "
                                           r"'shapes-\d+'\) has n_v=16 in the cache, the student gives its image 4.*"
                                           r"--iva-weight 0"):
        check_iva_compatible(ex)
    check_iva_compatible(cache_examples(CacheReader.open(world.cache), world.student_encoder(), None)[0])
    with pytest.raises(ValueError, match="IVA needs the student's vision-token count"):  # a second line of defence
        _batch(world, ex, LossConfig("alignti"))


def test_token_id_mismatch_names_the_sample(world):
    other = train_tokenizer(["completely different words for another vocabulary entirely"] * 4, vocab_size=280)
    _, processor = build_tiny_llava(TinySpec(), other)
    with pytest.raises(AlignTIError, match=r"sample [0-9a-f]{32} \(source 'shapes-\d+'\): the student's token ids "
                                           r"differ from the cached teacher ids at text token \d+"):
        cache_examples(CacheReader.open(world.cache), SampleEncoder(processor, None, 512), None)


def test_cached_samples_without_corpus_rows_are_an_error(world, tmp_path):
    rows = json.loads(open(world.data).read())
    reader = CacheReader.open(world.cache)
    subset = tmp_path / "subset.json"
    subset.write_text(json.dumps(rows[1:]))
    with pytest.raises(AlignTIError, match=r"1 cached sample\(s\) match no row of corpus .*e\.g\. sample [0-9a-f]{32}, "
                                           r"source 'shapes-\d+'"):
        cache_examples(reader, world.student_encoder(), str(subset))
    rows[2]["conversations"][-1]["value"] += " changed"
    subset.write_text(json.dumps(rows))
    with pytest.raises(AlignTIError, match=r"1 cached sample\(s\) match no row"):
        cache_examples(reader, world.student_encoder(), str(subset))


def test_rows_the_student_rejects_are_reported_not_fatal(world, examples):
    longest = max(e.student.length for e in examples)
    ex, rejects = cache_examples(CacheReader.open(world.cache), world.student_encoder(max_length=longest - 1), None)
    assert len(rejects) >= 1 and all(r.reason == "too_long" for r in rejects)
    assert len(ex) + len(rejects) == 6 and all(e.student.length < longest for e in ex)


def test_corpus_examples_for_sft(world):
    examples, rejects = corpus_examples(world.data, world.student_encoder(world.image_root))
    ex = list(examples)
    assert rejects == [] and len(ex) == 6 and all(e.signals is None for e in ex)
    cfg = LossConfig("sft")
    got = _values(objective_terms(world.student, _batch(world, ex, cfg), cfg))
    assert set(got) == {"sft"}
    ref = -sum(float(reference_logprobs(world.student, e.student.input_ids, e.student.images)[
        e.student.resp_positions, e.student.input_ids[e.student.resp_positions + 1]].sum()) for e in ex)
    assert got["sft"][0] == pytest.approx(ref, rel=REF_RTOL)
    with pytest.raises(ValueError, match=r"need teacher signals from a cache"):
        _batch(world, ex, LossConfig("kd"))
    with pytest.raises(AlignTIError, match="no sample has IVA signals"):
        check_iva_compatible(examples)


def test_padded_mass_and_out_of_vocab_candidates(world, examples):
    cfg = LossConfig("alignti")
    batch = _batch(world, examples, cfg)
    assert padded_mass_warning(batch, 300) == 0.0
    ref = 0.0
    for ids, lps in ((batch.kd_ids, batch.kd_logprobs), (batch.iva_ids, batch.iva_logprobs),
                     (batch.tpa_ids, batch.tpa_logprobs)):
        ref = max(ref, float(torch.where(ids >= 120, lps.double().exp(), 0.0).sum(-1).max()))
    assert ref > 1e-3 and padded_mass_warning(batch, 120) == pytest.approx(ref, rel=1e-5)
    # candidates beyond a (smaller) student vocabulary are masked: pad id in, weight 0
    small = _batch(world, examples, cfg, vocab_size=120)
    cand_ids = small.input_ids.reshape(-1)[small.tpa_rows].reshape(small.tpa_cand_logprobs.shape)
    orig = batch.input_ids.reshape(-1)[batch.tpa_rows].reshape(batch.tpa_cand_logprobs.shape)
    masked = orig >= 120
    assert masked.any() and (~masked).any()
    assert torch.equal(cand_ids[masked], torch.full_like(cand_ids[masked], world.pad_id))
    assert torch.isinf(small.tpa_cand_logprobs[masked]).all() and torch.isfinite(small.tpa_cand_logprobs[~masked]).all()
    assert small.counts()["tpa"] == float((~masked).any(-1).sum())
    assert small.max_input_id < 300
