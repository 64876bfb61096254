"""Tiny LLaVA models shared by the test packages: hand-built batches for the probe and ribbon
tests, and a shapes corpus with a teacher whose tokenizer is trained on it for the extract tests.

Random init (std 0.02) gives near-uniform attention, against which an attention test could pass
by accident; `sharpen` rescales the language model's projections so attention is peaked and
position-dependent.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch
from transformers import LlavaForConditionalGeneration, PreTrainedTokenizerFast, ProcessorMixin

from alignti.data.shapes import ShapesConfig, run_shapes
from alignti.models.llava import TinySpec, build_tiny_llava
from alignti.models.specs import TEXT_FAMILIES
from alignti.models.tokenizer import train_tokenizer

FAMILIES = TEXT_FAMILIES
TEXTS = ["what colour is the red circle in the top left corner", "how many green triangles are there"] * 4


@functools.lru_cache(maxsize=1)
def tokenizer() -> PreTrainedTokenizerFast:
    return train_tokenizer(TEXTS, vocab_size=300)


def sharpen(model: LlavaForConditionalGeneration, std: float = 0.15, seed: int = 0) -> LlavaForConditionalGeneration:
    """Re-draw every LM and projector linear weight with a larger std (peaked attention)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            in_lm = any(part in name for part in ("language_model", "projector", "lm_head"))
            if p.ndim == 2 and in_lm and "embed" not in name:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    return model


def tiny_model(family: str, layers: int = 2, attn: str = "sdpa") -> LlavaForConditionalGeneration:
    """fp32 eval-mode tiny LLaVA (hidden 64, GQA 4/2 heads, 32 px image, n_v = 16)."""
    model, _ = build_tiny_llava(TinySpec(text_family=family, layers=layers), tokenizer())
    model = sharpen(model)
    model.set_attn_implementation(attn)
    return model


def n_vision(model: LlavaForConditionalGeneration) -> int:
    vc = model.config.vision_config
    return (vc.image_size // vc.patch_size) ** 2


def make_sequence(model: LlavaForConditionalGeneration, prefix: int, suffix: int, seed: int) -> torch.Tensor:
    """LongTensor [prefix + n_v + suffix]: random text ids, a run of image tokens, random text ids."""
    gen = torch.Generator().manual_seed(seed)
    img = model.config.image_token_id
    low = max(img, model.config.text_config.pad_token_id) + 1  # never an image or pad id
    high = model.config.text_config.vocab_size
    pre = torch.randint(low, high, (prefix,), generator=gen)
    post = torch.randint(low, high, (suffix,), generator=gen)
    return torch.cat([pre, torch.full((n_vision(model),), img), post])


def pixel_values(batch: int, model: LlavaForConditionalGeneration, seed: int = 0) -> torch.Tensor:
    size = model.config.vision_config.image_size
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def pixels(sample) -> torch.Tensor | None:
    """An encoded LLaVA sample's pixel_values [1, 3, H, W] (None for text-only)."""
    return None if sample.images is None else sample.images.tensors["pixel_values"]


def pad_batch(seqs: list[torch.Tensor], pad_id: int, side: str) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Pad to a batch: input_ids [B, T], attention_mask [B, T], and each sample's offset."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    offsets = []
    for i, s in enumerate(seqs):
        off = width - len(s) if side == "left" else 0
        ids[i, off: off + len(s)] = s
        mask[i, off: off + len(s)] = 1
        offsets.append(off)
    return ids, mask, offsets


def shapes_teacher(root: Path, n: int, seed: int, layers: int = 3,
                   vocab_size: int = 200) -> tuple[LlavaForConditionalGeneration, ProcessorMixin, Path]:
    """A shapes corpus of n records in root/shapes and a tiny random teacher whose tokenizer is
    trained on its conversations: (model, processor, shapes dir). Reshape the weights if the
    test needs to, then save it with `save_model_dir`."""
    shapes = root / "shapes"
    run_shapes(ShapesConfig(out=str(shapes), n=n, seed=seed))
    rows = json.loads((shapes / "train.json").read_text())
    texts = [t["value"] for r in rows for t in r["conversations"]]
    model, processor = build_tiny_llava(TinySpec(layers=layers), train_tokenizer(texts, vocab_size=vocab_size))
    return model, processor, shapes
