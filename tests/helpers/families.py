"""One world per model family (LLaVA and the three Qwen-VL ones), built once per session and shared by
the extract, distill and resume tests: a shapes corpus whose images come in three sizes, a tiny
sharpened teacher, two student sizes sharing its tokenizer, and a cache made by `run_extract` with
`--iva-layer auto` (IRS over the image grids that repeat).

The references here are the models' own forwards: for Qwen-VL the model computes its M-RoPE
positions itself from `mm_token_type_ids`, independently of the family adapter's positions.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from PIL import Image

from alignti.data.images import ImageInputs
from alignti.data.shapes import ShapesConfig, run_shapes
from alignti.extract.run import ExtractConfig, run_extract
from alignti.models.family import get_family, save_model_dir
from alignti.models.tokenizer import train_tokenizer
from tests.helpers.models import sharpen

FAMILY_NAMES = ("llava", "qwen2_vl", "qwen2_5_vl", "qwen3_vl")
QWEN_NAMES = FAMILY_NAMES[1:]
# (width, height) of the corpus images after the first: with patch 8 and merge 2 Qwen-VL gives
# 64x64 4 x 4 tokens, 80x48 3 x 5 and 64x96 6 x 4; LLaVA resizes all of them to its 32 px (16 tokens).
RESIZED = {1: (80, 48), 2: (64, 96), 5: (80, 48)}
TEACHER = dict(hidden=64, layers=3, heads=4, kv_heads=2, vision_hidden=32, vision_layers=1, patch=8, seed=0)
STUDENTS = {"student": dict(TEACHER, hidden=32, layers=2, seed=1), "student_b": dict(TEACHER, hidden=48, seed=2)}
EXTRACT = dict(top_k=8, tpa_d=2, tpa_top_k=4, iva_layer="auto", irs_samples=16, iva_max_positions=6, iva_top_k=4,
               batch_size=8, max_length=256)


@dataclass(frozen=True)
class FamilyWorld:
    family: str
    shapes: Path  # image root; train.json is the corpus
    corpus: Path
    teacher: Path
    student: Path  # hidden 32, 2 layers
    student_b: Path  # hidden 48, 3 layers
    cache: Path


def build_model(family: str, sizes: dict, tokenizer, out: Path, sharp: bool = False) -> Path:
    fam = get_family(family)
    model, parts = fam.build_random(fam.random_spec(sizes), tokenizer)
    if sharp:  # peaked, position-dependent attention and distributions: targets far from uniform
        sharpen(model)
    return save_model_dir(model, parts, out)


@functools.lru_cache(maxsize=None)
def build_family_world(root: str, family: str) -> FamilyWorld:
    base = Path(root)
    shapes = base / "shapes"
    run_shapes(ShapesConfig(out=str(shapes), n=16, seed=5))
    corpus = shapes / "train.json"
    rows = json.loads(corpus.read_text())
    for i, size in RESIZED.items():  # three image sizes in one corpus
        path = shapes / rows[i]["image"]
        Image.open(path).convert("RGB").resize(size).save(path)
    tokenizer = train_tokenizer([t["value"] for r in rows for t in r["conversations"]], vocab_size=200)
    teacher = build_model(family, TEACHER, tokenizer, base / "teacher", sharp=True)
    from transformers import AutoTokenizer

    shared = AutoTokenizer.from_pretrained(teacher)  # as `assemble --tokenizer-from`
    dirs = {name: build_model(family, sizes, shared, base / name) for name, sizes in STUDENTS.items()}
    run_extract(ExtractConfig(teacher=str(teacher), data=str(corpus), image_root=str(shapes), out=str(base / "cache"),
                              **EXTRACT))
    return FamilyWorld(family, shapes, corpus, teacher, dirs["student"], dirs["student_b"], base / "cache")


def family_world(tmp_path_factory: pytest.TempPathFactory, family: str) -> FamilyWorld:
    return build_family_world(str(tmp_path_factory.getbasetemp() / f"family-{family}"), family)


def own_inputs(model, ids: torch.Tensor, images: ImageInputs | None) -> dict:
    """One unpadded sequence's inputs, positions left to the model (Qwen-VL: from mm_token_type_ids)."""
    kw = {"input_ids": ids[None], **({} if images is None else images.tensors)}
    if getattr(model.config, "vision_start_token_id", None) is not None:  # Qwen-VL
        kw["mm_token_type_ids"] = (ids[None] == model.config.image_token_id).int()
    return kw


def reference_logprobs(model, ids: torch.Tensor, images: ImageInputs | None) -> torch.Tensor:
    """float64 [T, V] log-softmax of the model's own plain forward of one sequence."""
    with torch.no_grad():
        return torch.log_softmax(model(**own_inputs(model, ids, images)).logits[0].double(), -1)


def eager_attentions(model, ids: torch.Tensor, images: ImageInputs | None) -> tuple[torch.Tensor, ...]:
    """Every LM layer's eager attention probabilities [1, H, T, T] for one sequence."""
    model.set_attn_implementation({"text_config": "eager"})
    try:
        with torch.no_grad():
            return model(**own_inputs(model, ids, images), output_attentions=True).attentions
    finally:
        model.set_attn_implementation({"text_config": "sdpa"})
