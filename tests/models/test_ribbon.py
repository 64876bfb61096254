"""The ribbon layout against separate plain forwards, the cached shortcut, backward and bf16."""

import pytest
import torch
from transformers import DynamicCache

from alignti.models.ribbon import build_candidate_pass, build_ribbon, gather_candidates, gather_ground_truth
from tests.helpers.models import FAMILIES, make_sequence, n_vision, pad_batch, pixel_values, tiny_model

D = 3
NEG = torch.finfo(torch.float32).min


def _problem(model, seed=0):
    """Two samples of different lengths with 3 and 0 steps (and a third with 1 step)."""
    nv = n_vision(model)
    seqs = [make_sequence(model, 3, 7, 1), make_sequence(model, 2, 4, 2), make_sequence(model, 4, 5, 3)]
    # the first step is the last image token: its candidates replace the first response token
    steps = [torch.tensor([3 + nv - 1, 3 + nv + 2, 3 + nv + 5]), torch.tensor([], dtype=torch.long),
             torch.tensor([4 + nv + 1])]
    gen = torch.Generator().manual_seed(seed)
    low = model.config.image_token_id + 1
    cands = [torch.randint(low, model.config.text_config.vocab_size, (len(s), D), generator=gen) for s in steps]
    return seqs, steps, cands


def test_layout_by_hand():
    ids = [torch.tensor([10, 11, 12, 13]), torch.tensor([14, 15])]
    cands = [torch.tensor([[20, 21], [22, 23]]), torch.zeros(0)]
    r = build_ribbon(ids, [torch.tensor([1, 2]), torch.tensor([])], cands, pad_id=0)
    assert r.input_ids.tolist() == [[10, 11, 20, 21, 12, 22, 23, 13], [14, 15, 0, 0, 0, 0, 0, 0]]
    assert r.position_ids.tolist() == [[0, 1, 2, 2, 2, 3, 3, 3], [0, 1, 0, 0, 0, 0, 0, 0]]
    assert r.gt_index.tolist() == [[0, 1, 4, 7], [0, 1, 0, 0]]
    assert r.gt_valid.tolist() == [[True] * 4, [True, True, False, False]]
    assert r.cand_batch.tolist() == [0, 0] and r.cand_step.tolist() == [1, 2]
    assert r.cand_index.tolist() == [[2, 3], [5, 6]]
    assert r.lengths.tolist() == [4, 2] and r.ribbon_lengths.tolist() == [8, 2]
    visible = [[0], [0, 1], [0, 1, 2], [0, 1, 3], [0, 1, 4], [0, 1, 4, 5], [0, 1, 4, 6], [0, 1, 4, 7]]
    expect = torch.full((2, 8, 8), NEG)
    for row, cols in enumerate(visible):
        expect[0, row, cols] = 0.0
    expect[1, 0, 0] = expect[1, 1, 0] = expect[1, 1, 1] = 0.0
    for row in range(2, 8):  # padding rows see only themselves
        expect[1, row, row] = 0.0
    assert r.attention_mask.shape == (2, 1, 8, 8) and r.attention_mask.dtype == torch.float32
    assert torch.equal(r.attention_mask[:, 0], expect)


def _plain_rows(model, seqs, steps, cands, pv):
    """Independent reference: one plain forward per sample and per (step, candidate)."""
    gt, cand = [], []
    with torch.no_grad():
        for b, seq in enumerate(seqs):
            gt.append(model(input_ids=seq[None], pixel_values=pv[b: b + 1]).logits[0])
            for i, t in enumerate(steps[b].tolist()):
                x = torch.stack([torch.cat([seq[: t + 1], cands[b][i, j: j + 1]]) for j in range(D)])
                cand.append(model(input_ids=x, pixel_values=pv[b: b + 1].expand(D, -1, -1, -1)).logits[:, -1])
    return gt, torch.stack(cand)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family", FAMILIES)
def test_ribbon_rows_equal_separate_plain_forwards(family, attn):
    model = tiny_model(family, attn=attn)
    seqs, steps, cands = _problem(model)
    pv = pixel_values(len(seqs), model)
    ribbon = build_ribbon(seqs, steps, cands, pad_id=0, image_token_id=model.config.image_token_id)
    with torch.no_grad():
        logits = model(**ribbon.model_inputs(), pixel_values=pv, use_cache=False).logits
    assert torch.isfinite(logits).all()  # padding rows are not empty
    gt_ref, cand_ref = _plain_rows(model, seqs, steps, cands, pv)
    gt = gather_ground_truth(ribbon, logits)
    for b, ref in enumerate(gt_ref):
        assert (gt[b, : len(ref)] - ref).abs().max() <= 1e-4
    cand = gather_candidates(ribbon, logits)
    assert cand.shape == (4, D, logits.shape[-1]) and ribbon.cand_batch.tolist() == [0, 0, 0, 2]
    assert (cand - cand_ref).abs().max() <= 1e-4
    # the check discriminates: a candidate's row is not the ground-truth row at its position
    nxt = torch.stack([gt[b, t + 1] for b, t in zip(ribbon.cand_batch.tolist(), ribbon.cand_step.tolist())])
    assert (cand - nxt[:, None]).abs().amax(dim=-1).min() > 1e-2


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_candidate_pass_equals_ribbon(family):
    model = tiny_model(family)
    seqs, steps, cands = _problem(model, seed=1)
    pv = pixel_values(len(seqs), model)
    ribbon = build_ribbon(seqs, steps, cands, pad_id=0)
    ids, mask, _ = pad_batch(seqs, 0, "right")
    with torch.no_grad():
        ribbon_logits = model(**ribbon.model_inputs(), pixel_values=pv, use_cache=False).logits
        cache = DynamicCache(config=model.config.text_config)
        plain = model(input_ids=ids, attention_mask=mask, pixel_values=pv, cache=cache, use_cache=True).logits
        cp = build_candidate_pass(seqs, steps, cands, cache_length=ids.shape[1], pad_id=0)
        cand_logits = model(**cp.model_inputs(), cache=cache, use_cache=True).logits
    assert torch.equal(cp.cand_batch, ribbon.cand_batch) and torch.equal(cp.cand_step, ribbon.cand_step)
    diff = gather_candidates(cp, cand_logits) - gather_candidates(ribbon, ribbon_logits)
    assert diff.abs().max() <= 1e-4
    assert (gather_ground_truth(ribbon, ribbon_logits) - plain)[ribbon.gt_valid].abs().max() <= 1e-4


def test_ribbon_backward_and_hidden_state_gather():
    model = tiny_model("qwen2").train()
    seqs, steps, cands = _problem(model)
    ribbon = build_ribbon(seqs, steps, cands, pad_id=0)
    hidden = model.model(**ribbon.model_inputs(), pixel_values=pixel_values(3, model), use_cache=False)[0]
    # apply the head to the needed rows only (what a 152k vocabulary calls for)
    cand_logits = model.lm_head(gather_candidates(ribbon, hidden))
    gt_logits = model.lm_head(gather_ground_truth(ribbon, hidden)[ribbon.gt_valid])
    loss = cand_logits.logsumexp(-1).mean() + gt_logits.logsumexp(-1).mean()
    loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "language_model" in n and p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.model.language_model.layers[0].self_attn.k_proj.weight.grad.abs().sum() > 0


def test_ribbon_bf16_forward():
    model = tiny_model("llama")
    seqs, steps, cands = _problem(model)
    pv = pixel_values(3, model)
    with torch.no_grad():
        fp32 = build_ribbon(seqs, steps, cands, pad_id=0)
        ref = model(**fp32.model_inputs(), pixel_values=pv, use_cache=False).logits
        model.to(torch.bfloat16)
        ribbon = build_ribbon(seqs, steps, cands, pad_id=0, dtype=torch.bfloat16)
        assert ribbon.attention_mask.dtype == torch.bfloat16
        out = model(**ribbon.model_inputs(), pixel_values=pv.bfloat16(), use_cache=False).logits
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert (out.float() - ref).abs().max() < 0.1 * ref.abs().max()


def test_ribbon_rejects_bad_input():
    ids = [torch.tensor([5, 3, 3, 6, 7, 8])]  # image token 3 at positions 1..2
    ok = torch.tensor([[9, 10]])
    with pytest.raises(ValueError, match="split the image"):
        build_ribbon(ids, [torch.tensor([1])], [ok], pad_id=0, image_token_id=3)
    with pytest.raises(ValueError, match="image token"):
        build_ribbon(ids, [torch.tensor([3])], [torch.tensor([[9, 3]])], pad_id=0, image_token_id=3)
    with pytest.raises(ValueError, match="strictly increasing"):
        build_ribbon(ids, [torch.tensor([4, 3])], [ok.repeat(2, 1)], pad_id=0)
    with pytest.raises(ValueError, match="strictly increasing"):
        build_ribbon(ids, [torch.tensor([6])], [ok], pad_id=0)
    with pytest.raises(ValueError, match="one d"):
        build_ribbon(ids * 2, [torch.tensor([3]), torch.tensor([4])], [ok, torch.tensor([[1, 2, 4]])], pad_id=0)
    with pytest.raises(ValueError, match="disagree"):
        build_ribbon(ids, [torch.tensor([3, 4])], [ok], pad_id=0)
    with pytest.raises(ValueError, match="shorter"):
        build_candidate_pass(ids, [torch.tensor([3])], [ok], cache_length=4, pad_id=0)
