"""The Qwen-VL family (Qwen2-VL, Qwen2.5-VL, Qwen3-VL): dynamic resolution and M-RoPE.

What this adapter owns, against the LLaVA defaults (`alignti.models.family`):
- dynamic resolution: the image processor resizes each image to a multiple of patch * merge
  within [min_pixels, max_pixels] (`smart_resize`), so the vision-token count varies per image:
  n_v = t * h * w / merge^2 for its `image_grid_thw` row (t, h, w) (in patches), known from the
  image size alone (`get_number_of_image_patches`, what vLLM asks too);
- `pixel_values` are flattened patches, [sum_i t_i * h_i * w_i, C * temporal_patch * patch^2], the
  images of a batch concatenated along dim 0 in order, with `image_grid_thw` [n_images, 3];
- positions are 3-D (M-RoPE, `qwen_vl_positions.py`): every forward gets explicit positions and
  `generate` gets `mm_token_type_ids`. Without either, transformers 5.24's Qwen2-VL / Qwen3-VL
  raise and Qwen2.5-VL silently numbers tokens 1-D (its logits then differ by ~5);
- the chat template marks an image as `<|vision_start|><|image_pad|><|vision_end|>`; the
  tokenisation path expands `<|image_pad|>` to n_v copies, as the processor does;
- the merger (and Qwen3-VL's deepstack mergers) is the projector, the rest of `model.visual` the tower.

No torchvision. Transformers 5.24 cannot build or load a Qwen-VL *processor* without it: the
processor insists on a video processor (processing_utils.py:668 checks every sub-processor's
class, `VideoProcessorMixin` is exported only with torchvision, __init__.py:335), and
`AutoProcessor.from_pretrained(dir, backend="pil")` asks for a PIL video processor, which does
not exist (video_processing_auto.py:137-142). The tokenizer, the PIL image processor and the
chat template are all the tokenisation path needs, so `load_parts` loads those (real
checkpoints have them: tokenizer files, preprocessor_config.json, a chat template) and
`save_parts` writes processor_config.json in the layout `Qwen2VLProcessor.save_pretrained`
writes, so `AutoProcessor.from_pretrained(dir)` loads a saved directory wherever torchvision is
installed.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from alignti.data.batching import Batch
from alignti.data.images import ImageInputs
from alignti.errors import AlignTIError
from alignti.models.family import Family, ModelParts, saved_chat_template
from alignti.models.qwen_vl_positions import gather_positions, image_token_ids, rope_positions
from alignti.models.qwen_vl_tiny import VISION_TOKENS, QwenVLSpec, build_tiny_qwen_vl

_PROCESSORS = {"qwen2_vl": "Qwen2VLProcessor", "qwen2_5_vl": "Qwen2_5_VLProcessor", "qwen3_vl": "Qwen3VLProcessor"}
_VIDEO_PROCESSORS = {"qwen2_vl": "Qwen2VLVideoProcessor", "qwen2_5_vl": "Qwen2VLVideoProcessor",
                     "qwen3_vl": "Qwen3VLVideoProcessor"}
# The image processor's settings that the video processor shares (its frame sampling keeps its defaults).
_VIDEO_KEYS = ("do_convert_rgb", "do_normalize", "do_rescale", "do_resize", "image_mean", "image_std", "merge_size",
               "patch_size", "resample", "rescale_factor", "size", "temporal_patch_size")


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())


class QwenVLFamily(Family):
    """One of Qwen2-VL, Qwen2.5-VL, Qwen3-VL (they differ in the model classes only)."""

    vision_keys = ("visual.",)
    projector_keys = ("visual.merger", "visual.deepstack_merger_list")

    def __init__(self, name: str) -> None:
        self.name = name
        self.model_types = (name,)

    # ---- parts and images

    def load_parts(self, path: Path, trust_remote_code: bool = False) -> ModelParts:
        try:
            tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
            image_processor = AutoImageProcessor.from_pretrained(path, backend="pil", trust_remote_code=False)
        except (OSError, ValueError) as e:
            raise AlignTIError(f"cannot load the tokenizer and image processor of {str(path)!r}: {_one_line(e)}"
                               ) from None
        return self.parts_of(tokenizer, image_processor, saved_chat_template(path) or tokenizer.chat_template)

    def parts_of(self, tokenizer: PreTrainedTokenizerBase, image_processor: Any, template: str | None) -> ModelParts:
        image_token = getattr(tokenizer, "image_token", None) or VISION_TOKENS["image_token"]  # as the processor
        if image_token not in tokenizer.get_vocab():
            raise AlignTIError(f"the tokenizer has no image token {image_token!r} (not a Qwen-VL tokenizer)")
        tokenizer.chat_template = template  # saved with the tokenizer (chat_template.jinja)
        return ModelParts(self, tokenizer, image_processor, template, image_token,
                          {"merge": image_processor.merge_size})

    def encode_images(self, parts: ModelParts, images: Sequence[Image.Image]) -> ImageInputs:
        out = parts.image_processor(images=list(images), return_tensors="pt")
        thw = out["image_grid_thw"].long()  # [n, 3] in patches
        merge = parts.settings["merge"]
        n_v = tuple((thw.prod(-1) // merge**2).tolist())  # processing_qwen2_vl.py:51-53
        grids = tuple((int(t * h // merge), int(w // merge)) for t, h, w in thw.tolist())
        return ImageInputs({"pixel_values": out["pixel_values"], "image_grid_thw": thw}, n_v, grids)

    def vision_tokens(self, parts: ModelParts, size: tuple[int, int] | None) -> int | None:
        if size is None:
            return None
        width, height = size
        return parts.image_processor.get_number_of_image_patches(height, width, {}) // parts.settings["merge"] ** 2

    def save_parts(self, parts: ModelParts, out: Path) -> None:
        """Tokenizer (with chat_template.jinja) and processor_config.json (image + video processor)."""
        parts.tokenizer.save_pretrained(out)
        settings = parts.image_processor.to_dict()
        video = {**{k: settings[k] for k in _VIDEO_KEYS if k in settings},
                 "video_processor_type": _VIDEO_PROCESSORS[self.name]}
        processor = {"image_processor": settings, "processor_class": _PROCESSORS[self.name], "video_processor": video}
        (out / "processor_config.json").write_text(json.dumps(processor, indent=2, sort_keys=True) + "\n")

    def vision_rule(self, root: Path) -> tuple[dict | None, int | None]:
        """patch, merge, temporal patch and the [min_pixels, max_pixels] range decide every image's n_v."""
        if not any((root / n).is_file() for n in ("preprocessor_config.json", "processor_config.json")):
            return None, None
        try:
            ip = AutoImageProcessor.from_pretrained(root, backend="pil", trust_remote_code=False)
        except (OSError, ValueError) as e:
            raise AlignTIError(f"cannot load the image processor of {str(root)!r}: {_one_line(e)}") from None
        return {"patch_size": ip.patch_size, "merge_size": ip.merge_size, "temporal_patch_size": ip.temporal_patch_size,
                "min_pixels": ip.size["shortest_edge"], "max_pixels": ip.size["longest_edge"]}, None

    def random_spec(self, sizes: dict[str, Any]) -> QwenVLSpec:
        chosen = {f.name: sizes[f.name] for f in fields(QwenVLSpec) if f.name in sizes and f.name != "family"}
        return QwenVLSpec(family=self.name, **chosen)

    def build_random(self, spec: QwenVLSpec, tokenizer: PreTrainedTokenizerBase) -> tuple[PreTrainedModel, ModelParts]:
        model, tok, image_processor = build_tiny_qwen_vl(spec, tokenizer)
        return model, self.parts_of(tok, image_processor, tok.chat_template)

    # ---- the model

    def plain_positions(self, model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                        images: dict[str, torch.Tensor]) -> torch.Tensor:
        """long [3, B, T] M-RoPE positions, from the model's own rope index."""
        return rope_positions(model, input_ids, attention_mask, images.get("image_grid_thw"))

    def ribbon_positions(self, plain: torch.Tensor | None, index: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """long [3, B, W]: each candidate takes its stand-in's triple, each ground-truth token its own."""
        assert plain is not None, "Qwen-VL ribbons need the plain batch's M-RoPE positions"
        return gather_positions(plain, index, lengths)

    def generation_inputs(self, model: PreTrainedModel, batch: Batch) -> dict[str, torch.Tensor]:
        """`generate` computes M-RoPE itself at prefill only from `mm_token_type_ids` (+ image_grid_thw);
        without them it silently falls back to 1-D positions."""
        ids = batch.input_ids
        return {**super().generation_inputs(model, batch),
                "mm_token_type_ids": image_token_ids(ids, model.config.image_token_id)}


QWEN_VL = tuple(QwenVLFamily(name) for name in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"))
