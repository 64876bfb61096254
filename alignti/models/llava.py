"""The LLaVA family: `LlavaForConditionalGeneration` = vision tower + projector + decoder LM.

Fixed grid: the processor resizes every image to one size, so every image has the same n_v
vision tokens (patch grid, plus CLS under the "default" feature strategy, minus it again), and
the decoder numbers its tokens with 1-D positions. The family's parts come from the directory's
`AutoProcessor` (PIL image backend).

Tiny random models for the demo, tests and trying every command: a SigLIP tower + 2-layer MLP
projector + a Qwen2 / Qwen3 / Llama decoder, saved with a processor so that `AutoProcessor` and
`AutoModelForImageTextToText` load it back. Teacher and student built with the same tokenizer
share token ids exactly, which the cache relies on.
"""

from __future__ import annotations

from collections.abc import Sequence
import json
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from transformers import (
    AutoImageProcessor,
    AutoProcessor,
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

from alignti.data.images import ImageInputs
from alignti.errors import AlignTIError
from alignti.models.specs import TinySpec
from alignti.models.family import Family, ModelParts
from alignti.models.tokenizer import IMAGE_TOKEN, ensure_image_token

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


def build_tiny_llava(spec: TinySpec, tokenizer: PreTrainedTokenizerBase
                     ) -> tuple[LlavaForConditionalGeneration, ModelParts]:
    """Random-weight tiny LLaVA model (fp32, eval mode) and its parts (`parts.settings["processor"]`)."""
    config = tiny_llava_config(spec, tokenizer)
    torch.manual_seed(spec.seed)
    model = LlavaForConditionalGeneration(config).eval()
    return model, LLAVA.parts_of(build_processor(tokenizer, spec.image_size, spec.patch))


EXPANSION_KEYS = ("patch_size", "vision_feature_select_strategy", "num_additional_image_tokens")


def _expansion(source: Any) -> dict:
    """The processor's settings that decide how `<image>` expands (from the object or its saved dict)."""
    get = source.get if isinstance(source, dict) else lambda k: getattr(source, k, None)
    return {k: get(k) for k in EXPANSION_KEYS}


def _grid(expansion: dict, height: int, width: int) -> tuple[tuple[int, int], int]:
    """((rows, cols) of patches, n_v) as LlavaProcessor expands `<image>` for a processed image size:
    grid + extra tokens (CLS), minus CLS under strategy "default"."""
    p = expansion["patch_size"]
    grid = (height // p, width // p)
    n = grid[0] * grid[1] + int(expansion["num_additional_image_tokens"] or 0)
    return grid, n - 1 if expansion["vision_feature_select_strategy"] == "default" else n


class LlavaFamily(Family):
    """Fixed-grid models whose processor has a `patch_size` (LLaVA; remote-code models alike)."""

    name = "llava"
    model_types = ("llava",)

    def load_parts(self, path: Path, trust_remote_code: bool = False) -> ModelParts:
        return self.parts_of(AutoProcessor.from_pretrained(path, backend="pil", trust_remote_code=trust_remote_code))

    def parts_of(self, processor: Any) -> ModelParts:
        """A LLaVA-style processor's parts; the vision-token count is read off a blank image once."""
        expansion = _expansion(processor)
        if expansion["patch_size"] is None:
            raise AlignTIError("processor has no patch_size: only LLaVA-style fixed-grid processors and the "
                               "Qwen-VL family are supported")
        pixels = processor.image_processor(images=[Image.new("RGB", (32, 32))], return_tensors="pt")["pixel_values"]
        _, n_v = _grid(expansion, *pixels.shape[-2:])
        return ModelParts(self, processor.tokenizer, processor.image_processor,
                          getattr(processor, "chat_template", None) or processor.tokenizer.chat_template,
                          getattr(processor, "image_token", IMAGE_TOKEN),
                          {"processor": processor, "expansion": expansion, "n_v": n_v})

    def encode_images(self, parts: ModelParts, images: Sequence[Image.Image]) -> ImageInputs:
        pixels = parts.image_processor(images=list(images), return_tensors="pt")["pixel_values"]  # [n, 3, H, W]
        grid, n_v = _grid(parts.settings["expansion"], *pixels.shape[-2:])
        return ImageInputs({"pixel_values": pixels}, (n_v,) * len(images), (grid,) * len(images))

    def vision_tokens(self, parts: ModelParts, size: tuple[int, int] | None) -> int | None:
        return parts.settings["n_v"]

    def save_parts(self, parts: ModelParts, out: Path) -> None:
        parts.settings["processor"].save_pretrained(out)

    def vision_rule(self, root: Path) -> tuple[dict | None, int | None]:
        """The processed size of an odd-sized probe image and the processor's expansion settings."""
        config = root / "processor_config.json"
        expansion = _expansion(json.loads(config.read_text(encoding="utf-8")) if config.is_file() else {})
        if not expansion["patch_size"]:
            return None, None
        try:
            image_processor = AutoImageProcessor.from_pretrained(root, backend="pil", trust_remote_code=False)
        except (OSError, ValueError) as e:
            raise AlignTIError(f"cannot load the image processor of {str(root)!r}: {' '.join(str(e).split())}"
                               ) from None
        pixels = image_processor(Image.new("RGB", (61, 37)), return_tensors="pt")["pixel_values"]
        h, w = (int(x) for x in pixels.shape[-2:])
        return {"size": [h, w], **expansion}, _grid(expansion, h, w)[1]

    def random_spec(self, sizes: dict[str, Any]) -> TinySpec:
        return TinySpec(**{f.name: sizes[f.name] for f in fields(TinySpec) if f.name in sizes})

    def build_random(self, spec: TinySpec, tokenizer: PreTrainedTokenizerBase
                     ) -> tuple[LlavaForConditionalGeneration, ModelParts]:
        return build_tiny_llava(spec, tokenizer)


LLAVA = LlavaFamily()
