"""The attention probe against eager `output_attentions`, and as an idle SDPA passthrough."""

import pytest
import torch

from alignti.models.probe import (
    PROBE_ATTENTION, install_probe, l1_normalize, probe_attention, register_probe, text_attn_implementation,
    uninstall_probe,
)
from alignti.models.ribbon import build_ribbon
from tests.helpers.models import FAMILIES, make_sequence, n_vision, pad_batch, pixel_values, tiny_model

LAYERS = 3
# (text tokens before the image, text tokens after it, seed) per sample; different lengths
SHAPES = {"none": [(3, 6, 1), (3, 6, 2)], "left": [(3, 6, 1), (5, 9, 2), (2, 4, 3)],
          "right": [(3, 6, 1), (5, 9, 2), (2, 4, 3)]}


def _batch(model, padding):
    """Batch kwargs plus per-sample instruction (after the image) and vision positions."""
    shapes, nv = SHAPES[padding], n_vision(model)
    seqs = [make_sequence(model, pre, post, seed) for pre, post, seed in shapes]
    ids, mask, offsets = pad_batch(seqs, model.config.text_config.pad_token_id, padding)
    kwargs = {"input_ids": ids, "pixel_values": pixel_values(len(seqs), model)}
    if padding != "none":
        kwargs["attention_mask"] = mask
    else:
        assert bool(mask.all())
    keys = [torch.arange(off + pre, off + pre + nv) for (pre, _, _), off in zip(shapes, offsets)]
    queries = [torch.arange(off + pre + nv, off + pre + nv + post) for (pre, post, _), off in zip(shapes, offsets)]
    return kwargs, queries, keys


def _eager_reference(model, kwargs, queries, keys):
    """Per layer [B, n_v]: eager attention probabilities, averaged over heads and query rows."""
    model.set_attn_implementation("eager")
    with torch.no_grad():
        attn = model(**kwargs, output_attentions=True).attentions
    model.set_attn_implementation("sdpa")
    assert len(attn) == model.config.text_config.num_hidden_layers
    return [torch.stack([a[b][:, queries[b]][:, :, keys[b]].mean(dim=(0, 1)) for b in range(len(keys))]) for a in attn]


@pytest.mark.parametrize("padding", ["none", "left", "right"])
@pytest.mark.parametrize("family", FAMILIES)
def test_probe_matches_eager_attentions(family, padding):
    model = tiny_model(family, layers=LAYERS)
    kwargs, queries, keys = _batch(model, padding)
    ref = _eager_reference(model, kwargs, queries, keys)
    # attention must be far from uniform, or a masking bug could hide
    assert min(r.std().item() for r in ref) > 5e-3
    with torch.no_grad():
        plain = model(**kwargs).logits
    for layers in ([LAYERS // 2], list(range(LAYERS))):
        with torch.no_grad(), probe_attention(model, layers, queries, keys) as probe:
            assert text_attn_implementation(model) == PROBE_ATTENTION
            out = model(**kwargs)
        assert out.attentions is None  # no output_attentions, no eager
        assert torch.equal(out.logits, plain)  # the probe does not change the forward
        raw, norm = probe.result(), probe.result(normalize=True)
        assert sorted(raw) == layers and probe.calls() == {layer: 1 for layer in layers}
        for layer in layers:
            assert raw[layer].dtype == torch.float32 and raw[layer].shape == (len(keys), n_vision(model))
            assert (raw[layer] - ref[layer]).abs().max() <= 1e-5
            assert torch.allclose(norm[layer].sum(-1), torch.ones(len(keys)), atol=1e-6)
            assert (norm[layer] - ref[layer] / ref[layer].sum(-1, keepdim=True)).abs().max() <= 1e-5
    assert text_attn_implementation(model) == "sdpa"  # restored on exit
    assert model.config.vision_config._attn_implementation == "sdpa"


def test_probe_on_ribbon_float_mask_matches_plain():
    """A 4-D float mask (the ribbon, as distill's student sees it) takes the additive-mask branch."""
    model = tiny_model("qwen2", layers=2)
    nv = n_vision(model)
    seqs = [make_sequence(model, 2, 6, 5), make_sequence(model, 3, 4, 6)]
    queries = [torch.arange(2 + nv, 2 + nv + 6), torch.arange(3 + nv, 3 + nv + 4)]
    keys = [torch.arange(2, 2 + nv), torch.arange(3, 3 + nv)]
    steps = [torch.tensor([2 + nv, 2 + nv + 3]), torch.tensor([3 + nv + 1])]
    cands = [torch.randint(10, 250, (2, 3)), torch.randint(10, 250, (1, 3))]
    ribbon = build_ribbon(seqs, steps, cands, pad_id=0, image_token_id=model.config.image_token_id)
    pv = pixel_values(2, model)
    ids, mask, _ = pad_batch(seqs, 0, "right")
    with torch.no_grad(), probe_attention(model, [1], queries, keys) as plain_probe:
        model(input_ids=ids, attention_mask=mask, pixel_values=pv)
    rq = [ribbon.gt_index[b, q] for b, q in enumerate(queries)]
    rk = [ribbon.gt_index[b, k] for b, k in enumerate(keys)]
    with torch.no_grad(), probe_attention(model, [1], rq, rk) as ribbon_probe:
        model(**ribbon.model_inputs(), pixel_values=pv, use_cache=False)
    assert (ribbon_probe.result()[1] - plain_probe.result()[1]).abs().max() <= 1e-5


def test_idle_probe_generate_matches_sdpa():
    model = tiny_model("llama", layers=2)
    kwargs, queries, keys = _batch(model, "left")
    gen = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        ref = model.generate(**kwargs, **gen)
    previous = install_probe(model)
    assert previous == "sdpa" and text_attn_implementation(model) == PROBE_ATTENTION
    with torch.no_grad():
        idle = model.generate(**kwargs, **gen)
    # an active probe inside generate fires on the prefill only (decode steps are passthrough)
    with torch.no_grad(), probe_attention(model, [1], queries, keys) as probe:
        active = model.generate(**kwargs, **gen)
    uninstall_probe(model, previous)
    assert text_attn_implementation(model) == "sdpa"
    assert torch.equal(idle, ref) and torch.equal(active, ref)
    assert probe.calls() == {1: 1}
    assert (probe.result()[1] - _eager_reference(model, kwargs, queries, keys)[1]).abs().max() <= 1e-5


def test_keep_graph_flows_gradients_to_the_probed_layer():
    model = tiny_model("qwen3", layers=2)
    kwargs, queries, keys = _batch(model, "right")
    with probe_attention(model, [1], queries, keys, keep_graph=True) as probe:
        model(**kwargs)
    alpha = probe.result(normalize=True)[1]
    assert alpha.requires_grad
    target = torch.full_like(alpha, 1.0 / alpha.shape[1])
    (target * (target.log() - alpha.log())).sum().backward()  # KL(w || alpha), as iva_target=attention
    q_grad = model.model.language_model.layers[1].self_attn.q_proj.weight.grad
    assert q_grad is not None and q_grad.abs().sum() > 0
    with probe_attention(model, [1], queries, keys) as probe:
        model(**kwargs)
    assert not probe.result()[1].requires_grad  # default: detached, no graph kept


@pytest.mark.parametrize("padding", ["left", "right"])
def test_samples_may_request_different_key_counts(padding):
    """Dynamic-resolution batches (Qwen-VL) key each sample on its own vision tokens: the result holds
    sample b's n_b columns, each equal to the full request's, then zeros (normalised over its own)."""
    model = tiny_model("qwen2", layers=2)
    kwargs, queries, keys = _batch(model, padding)
    ragged = [keys[0], keys[1][:-5], keys[2][3:]]
    with torch.no_grad():
        with probe_attention(model, [1], queries, keys) as full:
            model(**kwargs)
        with probe_attention(model, [1], queries, ragged) as probe:
            model(**kwargs)
    raw, norm, ref = probe.result()[1], probe.result(normalize=True)[1], full.result()[1]
    assert raw.shape == (3, n_vision(model))
    for b, cols in enumerate([slice(None), slice(None, -5), slice(3, None)]):
        n = len(ragged[b])
        assert torch.allclose(raw[b, :n], ref[b, cols], atol=1e-6) and bool((raw[b, n:] == 0).all())
        assert torch.allclose(norm[b, :n], ref[b, cols] / ref[b, cols].sum(), atol=1e-6)


def test_probe_rejects_bad_requests():
    model = tiny_model("qwen2", layers=2)
    kwargs, queries, keys = _batch(model, "right")
    with pytest.raises(ValueError, match="layers"):
        with probe_attention(model, [5], queries, keys):
            pass
    with pytest.raises(ValueError, match="out of range"):
        with torch.no_grad(), probe_attention(model, [0], queries, [k + 1000 for k in keys]):
            model(**kwargs)
    with pytest.raises(ValueError, match="no full forward"):
        with probe_attention(model, [0], queries, keys) as probe:
            pass
        probe.result()
    assert text_attn_implementation(model) == "sdpa"  # restored even after errors
    with torch.no_grad():
        model(**kwargs)  # and no stale request left on the modules


def test_l1_normalize_keeps_zero_rows_finite():
    out = l1_normalize(torch.tensor([[1.0, 3.0], [0.0, 0.0]]))
    assert torch.equal(out, torch.tensor([[0.25, 0.75], [0.0, 0.0]]))


def test_probe_can_be_chosen_at_load_time(tiny_model_dir):
    from alignti.models.loading import load_model

    register_probe()  # explicit: importing the probe module registers nothing
    model = load_model(tiny_model_dir, attn_implementation={"text_config": PROBE_ATTENTION})
    assert text_attn_implementation(model) == PROBE_ATTENTION
    assert model.config.vision_config._attn_implementation == "sdpa"
    kwargs, queries, keys = _batch(model, "left")
    with torch.no_grad(), probe_attention(model, [0], queries, keys) as probe:
        model(**kwargs)
    assert text_attn_implementation(model) == PROBE_ATTENTION  # left as the caller installed it
    assert probe.result()[0].shape == (3, n_vision(model))
