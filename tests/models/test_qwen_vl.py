"""Tiny Qwen2-VL / Qwen2.5-VL / Qwen3-VL through the family adapter: save and reload, variable-size
image batches, the probe against eager attentions (samples with different vision-token counts), and
the ribbon with M-RoPE positions against separate forwards."""

import functools
import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer, DynamicCache

from alignti.data.images import ImageInputs
from alignti.errors import AlignTIError
from alignti.models.family import family_of, get_family, load_parts, save_model_dir
from alignti.models.probe import probe_attention, text_attn_implementation
from alignti.models.qwen_vl_positions import gather_positions, image_token_ids, rope_positions
from alignti.models.qwen_vl_tiny import CHAT_TEMPLATE, VISION_TOKENS, QwenVLSpec
from alignti.models.specs import QWEN_VL_FAMILIES as FAMILIES
from alignti.models.ribbon import build_candidate_pass, build_ribbon, gather_candidates, gather_ground_truth
from alignti.models.tokenizer import train_tokenizer
from tests.helpers.models import pad_batch, sharpen

TEXTS = ["what colour is the red circle in the top left corner", "how many green triangles are there"] * 4
# (width, height) -> smart_resize at patch 14, merge 2, 56^2..112^2 pixels: 30x20 is scaled up to
# 84x56 (grid 4 x 6 patches, 6 tokens), 56x56 stays (2 x 2 merged, 4), 300x200 is scaled down
# to 112x84 (6 x 8, 12)
SIZES = [(30, 20), (56, 56), (300, 200)]
GRIDS = [[1, 4, 6], [1, 4, 4], [1, 6, 8]]
TOKENS = [6, 4, 12]
D = 3


@functools.lru_cache(maxsize=1)
def base_tokenizer():
    return train_tokenizer(TEXTS, vocab_size=300)


def tiny(family, layers=2, attn="sdpa"):
    """fp32 eval-mode tiny model (hidden 64, GQA 4/2 heads), peaked attention, plus its parts."""
    model, parts = get_family(family).build_random(QwenVLSpec(family=family, layers=layers), base_tokenizer())
    sharpen(model)
    model.set_attn_implementation(attn)
    return model, parts


def images(sizes, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]


def sequence(model, prefix, n_v, suffix, seed):
    """LongTensor [prefix + n_v + 2 + suffix]: text, <|vision_start|>, n_v image tokens, <|vision_end|>, text."""
    gen = torch.Generator().manual_seed(seed)
    cfg = model.config
    low, high = 4, cfg.vision_start_token_id  # BPE ids: after the four ChatML/pad specials, before Qwen's
    pre, post = torch.randint(low, high, (prefix,), generator=gen), torch.randint(low, high, (suffix,), generator=gen)
    vision = torch.tensor([cfg.vision_start_token_id] + [cfg.image_token_id] * n_v + [cfg.vision_end_token_id])
    return torch.cat([pre, vision, post])


def plain_inputs(model, seqs, images: ImageInputs, side="right"):
    """The model's own inputs (it computes its M-RoPE positions from mm_token_type_ids)."""
    ids, mask, offsets = pad_batch(seqs, model.config.text_config.pad_token_id, side)
    return {"input_ids": ids, "attention_mask": mask, **images.tensors,
            "mm_token_type_ids": image_token_ids(ids, model.config.image_token_id)}, offsets


def chat_inputs(tok, model, images: ImageInputs):
    """Left-padded prompts with each image's tokens expanded as the processor does."""
    text = tok.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what"}]}],
                                   tokenize=False, add_generation_prompt=True)
    pad = VISION_TOKENS["image_token"]
    seqs = [torch.tensor(tok(text.replace(pad, pad * n), add_special_tokens=False)["input_ids"]) for n in images.n_v]
    return plain_inputs(model, seqs, images, side="left")[0], text


@pytest.mark.parametrize("family", FAMILIES)
def test_saved_dir_reloads_and_generates_the_same(family, tmp_path):
    model, parts = tiny(family)
    batch = parts.encode_images(images(SIZES))
    inputs, _ = chat_inputs(parts.tokenizer, model, batch)
    gen = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": parts.tokenizer.pad_token_id}
    with torch.no_grad():
        ref = model.generate(**inputs, **gen)
    save_model_dir(model, parts, tmp_path)
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    tok2, ip2 = AutoTokenizer.from_pretrained(tmp_path), AutoImageProcessor.from_pretrained(tmp_path, backend="pil")
    assert type(loaded) is type(model) and loaded.config.model_type == family and family_of(loaded.config).name == family
    assert {name: getattr(tok2, name) for name in VISION_TOKENS} == VISION_TOKENS
    assert tok2.convert_tokens_to_ids(VISION_TOKENS["image_token"]) == loaded.config.image_token_id
    assert tok2.chat_template == CHAT_TEMPLATE
    settings = (ip2.size["shortest_edge"], ip2.size["longest_edge"], ip2.patch_size, ip2.merge_size)
    assert settings == (56**2, 112**2, 14, 2)
    reloaded = load_parts(tmp_path)  # the product's loader: tokenizer + PIL image processor + template
    assert reloaded.family is parts.family and reloaded.chat_template == CHAT_TEMPLATE
    assert reloaded.image_token == VISION_TOKENS["image_token"] and reloaded.image_token_id == loaded.config.image_token_id
    again = reloaded.encode_images(images(SIZES))
    assert torch.equal(again.tensors["pixel_values"], batch.tensors["pixel_values"]) and again.n_v == batch.n_v
    with torch.no_grad():
        out = loaded.generate(**inputs, **gen)
    assert out.shape == (3, inputs["input_ids"].shape[1] + 5) and torch.equal(out, ref)
    # the loaded language model takes the probe too (its attentions hold the loaded text_config)
    image_pos = [torch.nonzero(row == loaded.config.image_token_id).flatten()[:4] for row in inputs["input_ids"]]
    last = [torch.tensor([inputs["input_ids"].shape[1] - 1])] * 3
    with torch.no_grad(), probe_attention(loaded, [1], last, image_pos) as probe:
        loaded(**inputs)
    assert probe.result()[1].shape == (3, 4) and text_attn_implementation(loaded) == "sdpa"
    saved = json.loads((tmp_path / "processor_config.json").read_text())
    assert saved["processor_class"].lower().replace("_", "") == family.replace("_", "") + "processor"
    assert saved["video_processor"]["patch_size"] == 14


@pytest.mark.parametrize("family", FAMILIES)
def test_autoprocessor_loads_the_dir_and_expands_as_we_do(family, tmp_path):
    pytest.importorskip("torchvision", reason="transformers' Qwen-VL processors need torchvision")
    from transformers import AutoProcessor

    model, parts = tiny(family)
    save_model_dir(model, parts, tmp_path)
    processor = AutoProcessor.from_pretrained(tmp_path)  # backend="pil" would ask for a PIL *video* processor
    processor.image_processor = AutoImageProcessor.from_pretrained(tmp_path, backend="pil")
    batch = parts.encode_images(images(SIZES))
    ours, text = chat_inputs(parts.tokenizer, model, batch)
    theirs = processor(images=images(SIZES), text=[text] * 3, padding=True, padding_side="left", return_tensors="pt")
    for key in ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw"):
        assert torch.equal(theirs[key], ours[key]), key


@pytest.mark.parametrize("family", FAMILIES)
def test_a_batch_of_three_image_sizes(family):
    model, parts = tiny(family)
    batch = parts.encode_images(images(SIZES))
    thw = batch.tensors["image_grid_thw"]
    assert thw.tolist() == GRIDS and list(batch.n_v) == TOKENS
    assert list(batch.grids) == [(2, 3), (2, 2), (3, 4)]  # merged tokens: rows, cols
    assert [parts.vision_tokens(size) for size in SIZES] == TOKENS  # from the size alone, as vLLM asks
    assert parts.vision_tokens(None) is None  # no fixed count
    assert batch.tensors["pixel_values"].shape == (4 * sum(TOKENS), 3 * 2 * 14 * 14)
    singles = [parts.encode_images([im]) for im in images(SIZES)]
    joined = ImageInputs.concat(singles)
    assert all(torch.equal(joined.tensors[k], batch.tensors[k]) for k in batch.tensors)
    assert (joined.n_v, joined.grids) == (batch.n_v, batch.grids)
    with torch.no_grad():
        feats = model.model.get_image_features(batch.tensors["pixel_values"], thw).pooler_output
        assert [f.shape[0] for f in feats] == TOKENS
        seqs = [sequence(model, 2 + b, n, 5 - b, seed=b) for b, n in enumerate(TOKENS)]
        inputs, _ = plain_inputs(model, seqs, batch)
        logits = model(**inputs).logits
        for b, (seq, single) in enumerate(zip(seqs, singles)):  # each sample alone gets its own image back
            alone = model(**plain_inputs(model, [seq], single)[0]).logits[0]
            assert (logits[b, : len(seq)] - alone).abs().max() <= 1e-5


def _eager_attentions(model, kwargs):
    """Every LM layer's eager attention probabilities [B, H, T, T] (the vision tower runs eager too)."""
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            return model(**kwargs, output_attentions=True).attentions
    finally:
        model.set_attn_implementation("sdpa")


# (text before the image, image size index, text after it) per sample
PROBE_SHAPES = {"none": [(3, 1, 6), (3, 1, 6)], "left": [(3, 0, 6), (5, 2, 9), (2, 1, 4)],
                "right": [(3, 0, 6), (5, 2, 9), (2, 1, 4)]}


@pytest.mark.parametrize("padding", ["none", "left", "right"])
@pytest.mark.parametrize("family", FAMILIES)
def test_probe_matches_eager_attentions(family, padding):
    model, parts = tiny(family, layers=3)
    shapes = PROBE_SHAPES[padding]
    batch = parts.encode_images(images([SIZES[i] for _, i, _ in shapes]))
    seqs = [sequence(model, pre, TOKENS[i], post, seed=b) for b, (pre, i, post) in enumerate(shapes)]
    kwargs, offsets = plain_inputs(model, seqs, batch, side="left" if padding == "left" else "right")
    if padding == "none":
        assert bool(kwargs["attention_mask"].all())
        del kwargs["attention_mask"]  # SDPA then gets no mask: the probe rebuilds the causal rows
    # vision keys: the image tokens; queries: the text after <|vision_end|>
    keys = [torch.arange(o + pre + 1, o + pre + 1 + TOKENS[i]) for (pre, i, _), o in zip(shapes, offsets)]
    queries = [k[-1] + 2 + torch.arange(post) for k, (_, _, post) in zip(keys, shapes)]
    attn = _eager_attentions(model, kwargs)
    assert len(attn) == 3
    # per layer and sample [n_keys_b]: averaged over heads and query rows
    ref = [[a[b][:, queries[b]][:, :, keys[b]].mean(dim=(0, 1)) for b in range(len(keys))] for a in attn]
    assert min(torch.cat(r).std().item() for r in ref) > 5e-3  # far from uniform, or a masking bug could hide
    with torch.no_grad():
        plain = model(**kwargs).logits
        with probe_attention(model, [0, 2], queries, keys) as probe:  # each sample its own key count
            out = model(**kwargs)
    assert torch.equal(out.logits, plain)
    assert text_attn_implementation(model) == "sdpa" and model.config.vision_config._attn_implementation == "sdpa"
    for layer in (0, 2):
        raw, norm = probe.result()[layer], probe.result(normalize=True)[layer]
        for b, r in enumerate(ref[layer]):
            n = len(keys[b])
            assert (raw[b, :n] - r).abs().max() <= 1e-5 and bool((raw[b, n:] == 0).all())
            assert (norm[b, :n] - r / r.sum()).abs().max() <= 1e-5


def _candidates(model, steps, seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(4, model.config.vision_start_token_id, (len(s), D), generator=gen) for s in steps]


def _separate_rows(model, seqs, steps, cands, singles):
    """Independent reference: one plain forward per sample and per (step, candidate), each with its
    own image and the positions the model computes itself."""
    gt, cand = [], []
    with torch.no_grad():
        for b, seq in enumerate(seqs):
            gt.append(model(**plain_inputs(model, [seq], singles[b])[0]).logits[0])
            for i, t in enumerate(steps[b].tolist()):
                rows = [torch.cat([seq[: t + 1], cands[b][i, j: j + 1]]) for j in range(D)]
                one = ImageInputs.concat([singles[b]] * D)
                cand.append(model(**plain_inputs(model, rows, one)[0]).logits[:, -1])
    return gt, torch.stack(cand)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family", FAMILIES)
def test_ribbon_with_mrope_equals_separate_forwards(family, attn):
    model, parts = tiny(family, attn=attn)
    singles = [parts.encode_images([im]) for im in images([SIZES[0], SIZES[2]])]
    batch = ImageInputs.concat(singles)
    seqs = [sequence(model, 3, TOKENS[0], 7, seed=1), sequence(model, 2, TOKENS[2], 4, seed=2)]
    last_image = [3 + TOKENS[0], 2 + TOKENS[2]]
    # the first step is the last image token: its candidates stand in for <|vision_end|>
    steps = [torch.tensor([last_image[0], last_image[0] + 2, last_image[0] + 5]), torch.tensor([last_image[1] + 3])]
    cands = _candidates(model, steps, seed=0)
    plain, _ = plain_inputs(model, seqs, batch)
    ribbon = build_ribbon(seqs, steps, cands, pad_id=0, image_token_id=model.config.image_token_id)
    fam = family_of(model.config)
    positions = fam.plain_positions(model, plain["input_ids"], plain["attention_mask"], batch.tensors)
    mrope = fam.ribbon_positions(positions, ribbon.position_ids, ribbon.lengths)
    assert mrope.shape == (3, 2, ribbon.input_ids.shape[1])
    vision = batch.tensors
    with torch.no_grad():
        ref_plain = model(**plain).logits
        logits = model(**ribbon.model_inputs() | {"position_ids": mrope}, **vision, use_cache=False).logits
        one_d = model(**ribbon.model_inputs(), **vision, use_cache=False).logits
    gt_ref, cand_ref = _separate_rows(model, seqs, steps, cands, singles)
    gt, cand = gather_ground_truth(ribbon, logits), gather_candidates(ribbon, logits)
    assert (gt - ref_plain)[ribbon.gt_valid].abs().max() <= 1e-5
    for b, ref in enumerate(gt_ref):
        assert (gt[b, : len(ref)] - ref).abs().max() <= 1e-5
    assert cand.shape == (4, D, logits.shape[-1]) and (cand - cand_ref).abs().max() <= 1e-5
    # the check discriminates: a candidate's row is not its stand-in's row, and 1-D positions are wrong
    nxt = torch.stack([gt[b, t + 1] for b, t in zip(ribbon.cand_batch.tolist(), ribbon.cand_step.tolist())])
    assert (cand - nxt[:, None]).abs().amax(dim=-1).min() > 1e-2
    assert (gather_ground_truth(ribbon, one_d) - ref_plain)[ribbon.gt_valid].abs().max() > 1e-2


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_candidate_pass_with_mrope_equals_separate_forwards(family):
    model, parts = tiny(family)
    singles = [parts.encode_images([im]) for im in images([SIZES[1], SIZES[0]], seed=3)]
    batch = ImageInputs.concat(singles)
    seqs = [sequence(model, 2, TOKENS[1], 8, seed=3), sequence(model, 4, TOKENS[0], 3, seed=4)]
    steps = [torch.tensor([2 + TOKENS[1] + 1, 2 + TOKENS[1] + 4]), torch.tensor([4 + TOKENS[0] + 2])]
    cands = _candidates(model, steps, seed=1)
    plain, _ = plain_inputs(model, seqs, batch)
    positions = rope_positions(model, plain["input_ids"], plain["attention_mask"], batch.tensors["image_grid_thw"])
    width = plain["input_ids"].shape[1]
    cp = build_candidate_pass(seqs, steps, cands, cache_length=width, pad_id=0)
    with torch.no_grad():
        cache = DynamicCache(config=model.config.text_config)
        model(**plain, cache=cache, use_cache=True)
        lengths = torch.tensor([len(s) for s in seqs])
        inputs = cp.model_inputs() | {"position_ids": gather_positions(positions, cp.position_ids, lengths)}
        cand = gather_candidates(cp, model(**inputs, cache=cache, use_cache=True).logits)
    _, cand_ref = _separate_rows(model, seqs, steps, cands, singles)
    assert (cand - cand_ref).abs().max() <= 1e-5


def test_gather_positions_by_hand():
    # one sample of 5 tokens whose triples differ per axis; step 1 gets 2 candidates (stand-in: token 2)
    positions = torch.tensor([[[0, 1, 1, 1, 3]], [[0, 1, 1, 2, 3]], [[0, 1, 2, 1, 3]]])
    ribbon = build_ribbon([torch.arange(10, 15)], [torch.tensor([1])], [torch.tensor([[20, 21]])], pad_id=0)
    assert ribbon.position_ids.tolist() == [[0, 1, 2, 2, 2, 3, 4]]
    got = gather_positions(positions, ribbon.position_ids, ribbon.lengths)
    assert got[:, 0].tolist() == [[0, 1, 1, 1, 1, 1, 3], [0, 1, 1, 1, 1, 2, 3], [0, 1, 2, 2, 2, 1, 3]]
    last = build_ribbon([torch.arange(10, 15)], [torch.tensor([4])], [torch.tensor([[20, 21]])], pad_id=0)
    with pytest.raises(ValueError, match="past its sample"):
        gather_positions(positions, last.position_ids, last.lengths)


def test_spec_rejects_bad_settings():
    with pytest.raises(AlignTIError, match="unknown Qwen-VL family"):
        QwenVLSpec(family="qwen2")
    with pytest.raises(AlignTIError, match="min_pixels"):
        QwenVLSpec(min_pixels=112 * 112 + 1)
    with pytest.raises(AlignTIError, match="head size"):
        QwenVLSpec(hidden=24, heads=4, kv_heads=2)
