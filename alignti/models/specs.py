"""Sizes of the tiny random models `alignti assemble --random` builds, torch-free.

Each field is an `assemble --random` option, so `alignti.cli` reads these without importing
torch or transformers; the builders are `alignti.models.llava` and `alignti.models.qwen_vl_tiny`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from alignti.errors import AlignTIError

QWEN_VL_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
FAMILY_NAMES = ("llava", *QWEN_VL_FAMILIES)  # every model family (alignti.models.family.families())
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


@dataclass(frozen=True)
class QwenVLSpec:
    """Sizes of a tiny Qwen-VL model (the field names match `TinySpec`'s where they mean the same)."""

    family: str = field(default="qwen2_5_vl", metadata={"help": "qwen2_vl | qwen2_5_vl | qwen3_vl"})
    hidden: int = field(default=64, metadata={"help": "LM hidden size"})
    layers: int = field(default=2, metadata={"help": "LM decoder layers"})
    heads: int = field(default=4, metadata={"help": "LM attention heads"})
    kv_heads: int = field(default=2, metadata={"help": "LM key/value heads (GQA when < heads)"})
    vision_hidden: int = field(default=32, metadata={"help": "vision tower hidden size"})
    vision_layers: int = field(default=2, metadata={"help": "vision tower layers"})
    patch: int = field(default=14, metadata={"help": "vision patch size in pixels"})
    merge: int = field(default=2, metadata={"help": "spatial merge: merge x merge patches -> 1 token"})
    min_pixels: int = field(default=56 * 56, metadata={"help": "image processor's smallest resized area"})
    max_pixels: int = field(default=112 * 112, metadata={"help": "image processor's largest resized area"})
    seed: int = field(default=0, metadata={"help": "weight initialisation seed"})

    def __post_init__(self) -> None:
        if self.family not in QWEN_VL_FAMILIES:
            raise AlignTIError(f"unknown Qwen-VL family {self.family!r}; use one of {QWEN_VL_FAMILIES}")
        if self.hidden % self.heads or self.heads % self.kv_heads:
            raise AlignTIError("hidden must divide by heads and heads by kv_heads")
        head = self.hidden // self.heads
        if head % 2 or head < 8:
            raise AlignTIError(f"head size hidden / heads = {head}: must be even and >= 8 (3 rotary axes)")
        if self.vision_hidden % 16:
            raise AlignTIError("vision hidden size must be a multiple of 16 (heads of width 16)")
        if self.min_pixels > self.max_pixels or self.min_pixels < (self.patch * self.merge) ** 2:
            raise AlignTIError("need (patch * merge)^2 <= min_pixels <= max_pixels")
