"""Tiny random LLaVA models built in-process, for the demo, tests and trying every command.

A model is `LlavaForConditionalGeneration` = SigLIP vision tower + 2-layer MLP projector +
a Qwen2 / Qwen3 / Llama decoder, saved with a processor so that `AutoProcessor` and
`AutoModelForImageTextToText` load it back from a local directory. Teacher and student built
with the same tokenizer share token ids exactly, which the cache relies on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import (
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerBase,
    Qwen2Config,
    Qwen3Config,
    SiglipImageProcessorPil,
    SiglipVisionConfig,
)

from alignti.errors import AlignTIError
from alignti.models.tokenizer import IMAGE_TOKEN, ensure_image_token

TEXT_FAMILIES = ("qwen2", "qwen3", "llama")


@dataclass(frozen=True)
class TinySpec:
    """Sizes of a tiny LLaVA model; every field is an `assemble --random` option."""

    text_family: str = field(default="qwen2", metadata={"help": "qwen2 | qwen3 | llama"})
    hidden: int = field(default=64, metadata={"help": "LM hidden size"})
    layers: int = field(default=2, metadata={"help": "LM decoder layers"})
    heads: int = field(default=4, metadata={"help": "LM attention heads"})
    kv_heads: int = field(default=2, metadata={"help": "LM key/value heads (GQA when < heads)"})
    vision_hidden: int = field(default=32, metadata={"help": "vision tower hidden size"})
    vision_layers: int = field(default=1, metadata={"help": "vision tower layers"})
    image_size: int = field(default=32, metadata={"help": "input image side in pixels"})
    patch: int = field(default=8, metadata={"help": "vision patch size (n_v = (image/patch)^2)"})
    seed: int = field(default=0, metadata={"help": "weight initialisation seed"})

    def __post_init__(self) -> None:
        if self.text_family not in TEXT_FAMILIES:
            raise AlignTIError(f"unknown text family {self.text_family!r}; use one of {TEXT_FAMILIES}")
        if self.hidden % self.heads or self.heads % self.kv_heads:
            raise AlignTIError("hidden must divide by heads and heads by kv_heads")
        if self.vision_hidden % 16 and self.vision_hidden > 16:
            raise AlignTIError("vision hidden size must be a multiple of 16 (heads of width 16)")
        if self.image_size % self.patch:
            raise AlignTIError("image size must be a multiple of the patch size")


def _text_config(spec: TinySpec, vocab_size: int, pad_id: int) -> Qwen2Config | Qwen3Config | LlamaConfig:
    common = dict(
        vocab_size=vocab_size,
        hidden_size=spec.hidden,
        intermediate_size=spec.hidden * 2,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.kv_heads,
        max_position_embeddings=4096,
        pad_token_id=pad_id,
        tie_word_embeddings=False,
    )
    if spec.text_family == "qwen2":
        return Qwen2Config(**common)
    if spec.text_family == "qwen3":
        return Qwen3Config(head_dim=spec.hidden // spec.heads, **common)
    return LlamaConfig(**common)


def tiny_llava_config(spec: TinySpec, tokenizer: PreTrainedTokenizerBase) -> LlavaConfig:
    """LlavaConfig for `spec`; SigLIP has no CLS token, hence strategy "full"."""
    image_token_id = ensure_image_token(tokenizer)
    vision = SiglipVisionConfig(
        hidden_size=spec.vision_hidden,
        intermediate_size=spec.vision_hidden * 2,
        num_hidden_layers=spec.vision_layers,
        num_attention_heads=max(1, spec.vision_hidden // 16),
        image_size=spec.image_size,
        patch_size=spec.patch,
    )
    text = _text_config(spec, len(tokenizer), tokenizer.pad_token_id)
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=image_token_id,
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        image_seq_length=(spec.image_size // spec.patch) ** 2,
        projector_hidden_act="gelu",
        tie_word_embeddings=False,
    )


def build_processor(
    tokenizer: PreTrainedTokenizerBase, image_size: int, patch: int, image_mean: list[float] | None = None,
    image_std: list[float] | None = None,
) -> LlavaProcessor:
    """A LLaVA processor (PIL image backend: identical pixels with or without torchvision)."""
    image_processor = SiglipImageProcessorPil(
        size={"height": image_size, "width": image_size},
        image_mean=image_mean or [0.5, 0.5, 0.5],
        image_std=image_std or [0.5, 0.5, 0.5],
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch,
        vision_feature_select_strategy="full",
        chat_template=tokenizer.chat_template,
        image_token=IMAGE_TOKEN,
    )


def build_tiny_llava(spec: TinySpec, tokenizer: PreTrainedTokenizerBase) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """Random-weight tiny LLaVA model (fp32, eval mode) and its processor."""
    config = tiny_llava_config(spec, tokenizer)
    torch.manual_seed(spec.seed)
    model = LlavaForConditionalGeneration(config).eval()
    return model, build_processor(tokenizer, spec.image_size, spec.patch)


def save_model_dir(model: LlavaForConditionalGeneration, processor: LlavaProcessor, out: str | Path) -> Path:
    """Save weights (safetensors), config, tokenizer and processor into one directory."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out
