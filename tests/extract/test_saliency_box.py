"""IVA saliency lands on the asked-about object: a deterministic construction through the real code.

A tiny LLaVA teacher is wired by hand so that, at LM layer 0, every text token attends to the
vision tokens in proportion to how *red* their patch is: the vision tower passes a per-patch
"redness" feature (mean R - (G+B)/2) straight through, the projector copies it to one LM
dimension, and q/k of layer 0 pair a constant text dimension with that one, on the slowest RoPE
frequency so position barely matters. Images hold one red square (the queried object) and a blue
circle at asymmetric places, so a transposed or shifted vision grid, a wrong probe row, or a wrong
box mapping would put the mass elsewhere. The saliency comes from `HfTeacher` (the extraction
code) and the measure from `box_mass` (the demo's report).
"""

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from alignti.data.batching import collate
from alignti.data.corpus import parse_row
from alignti.data.encode import SampleEncoder
from alignti.demo.saliency import box_mass
from alignti.extract.teacher import HfTeacher
from alignti.models.llava import TinySpec, build_tiny_llava
from alignti.models.tokenizer import train_tokenizer
from alignti.storage.schema import CacheSettings

PATCH, SIDE = 16, 64


@torch.no_grad()
def redness_teacher():
    tok = train_tokenizer(["What shape is the red object? square circle"] * 4, vocab_size=300)
    spec = TinySpec(hidden=64, layers=2, heads=4, kv_heads=2, vision_hidden=32, vision_layers=1,
                    image_size=SIDE, patch=PATCH)
    model, processor = build_tiny_llava(spec, tok)
    v = model.model.vision_tower
    emb = v.embeddings
    emb.patch_embedding.weight.zero_()
    emb.patch_embedding.bias.zero_()
    area = PATCH * PATCH
    emb.patch_embedding.weight[0, 0] = 1 / area  # feature 0 = mean(R) - (mean(G) + mean(B)) / 2
    emb.patch_embedding.weight[0, 1] = -0.5 / area
    emb.patch_embedding.weight[0, 2] = -0.5 / area
    emb.position_embedding.weight.zero_()
    layer = v.encoder.layers[0]  # residual passes the embeddings through unchanged
    for lin in (layer.self_attn.out_proj, layer.mlp.fc2):
        lin.weight.zero_()
        lin.bias.zero_()
    proj = model.model.multi_modal_projector
    for lin in (proj.linear_1, proj.linear_2):
        lin.weight.zero_()
        lin.bias.zero_()
    proj.linear_1.weight[0, 0] = 1.0  # LM dim 0 = gelu(redness): > 0 red, ~0 background, < 0 blue
    proj.linear_2.weight[0, 0] = 1.0
    lm = model.model.language_model
    lm.embed_tokens.weight[:, 0] = 0.0  # text has nothing in the "redness" dimension ...
    lm.embed_tokens.weight[:, 1] = 1.0  # ... and a constant "I am text" dimension
    attn = lm.layers[0].self_attn
    hd = model.config.text_config.hidden_size // model.config.text_config.num_attention_heads
    slow = hd // 2 - 1  # the slowest RoPE pair: ~1e-3 rad per position
    for w in (attn.q_proj.weight, attn.k_proj.weight, attn.q_proj.bias, attn.k_proj.bias):
        w.zero_()
    for h in range(model.config.text_config.num_attention_heads):
        attn.q_proj.weight[h * hd + slow, 1] = 1.0
    for h in range(model.config.text_config.num_key_value_heads):
        attn.k_proj.weight[h * hd + slow, 0] = 1.0
    return model.eval(), processor


def scene(path, red_cell, blue_cell):
    """64x64 dark image; a red square filling one 16px cell and a blue circle in another."""
    im = Image.new("RGB", (SIDE, SIDE), (24, 24, 24))
    d = ImageDraw.Draw(im)
    (rx, ry), (bx, by) = red_cell, blue_cell
    box = (rx * PATCH, ry * PATCH, rx * PATCH + PATCH, ry * PATCH + PATCH)
    d.rectangle([box[0], box[1], box[2] - 1, box[3] - 1], fill=(255, 0, 0))
    d.ellipse([bx * PATCH, by * PATCH, bx * PATCH + PATCH - 1, by * PATCH + PATCH - 1], fill=(0, 0, 255))
    im.save(path)
    return box


@pytest.mark.parametrize("red_cell,blue_cell", [((3, 0), (0, 3)), ((1, 2), (2, 1)), ((0, 1), (3, 3))])
def test_saliency_mass_is_on_the_queried_object(tmp_path, red_cell, blue_cell):
    model, processor = redness_teacher()
    box = scene(tmp_path / "img.png", red_cell, blue_cell)
    row = parse_row({"id": "s", "image": "img.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat shape is the red object?"}, {"from": "gpt", "value": "square"}]},
        "s")
    sample = SampleEncoder(processor, str(tmp_path), 256).encode(row)
    settings = CacheSettings(top_k=4, tpa_d=0, iva_layer=0, iva_max_positions=2, iva_top_k=2)
    sig = HfTeacher(model, settings, processor.tokenizer.pad_token_id)(collate([sample], 0))[0]
    mass, share = box_mass(sig.saliency, (SIDE, SIDE), box)
    assert share == pytest.approx(1 / 16)
    assert mass > 0.9, (mass, np.round(sig.saliency.reshape(4, 4), 3))
    # the most salient vision position is the red cell, in row-major (y, x) order
    assert int(sig.iva_positions[0]) == red_cell[1] * 4 + red_cell[0]
