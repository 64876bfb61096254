"""Model-family adapters: what differs between VLM families, behind one interface.

Extraction, distillation, IRS, evaluation and the probe call a `Family` and never branch on
which one it is; only `alignti/models/` knows the families. A family owns:

- its directory's parts (`load_parts` -> `ModelParts`): tokenizer, PIL image processor, chat
  template, image token; saving them beside the weights (`ModelParts.save`);
- images -> model inputs (`encode_images` -> `data.images.ImageInputs`) and the vision tokens
  of an image from its size alone (`vision_tokens`), for start-up lengths and IVA checks;
- position ids: of a plain padded batch (`plain_positions`: None when the model numbers tokens
  itself) and of a ribbon or candidate pass (`ribbon_positions`: each slot takes the position of
  the original token it stands for);
- the decoder and LM head (`decoder`, `lm_head`) and generation inputs (`generation_inputs`);
- which parameters are the vision tower and the projector (`part_of`, for `distill --train`);
- the settings that decide each image's vision-token count (`vision_rule`, for the fingerprint);
- tiny random models (`build_random`) for `assemble --random`, the tests and the demo.

A new family (LLaVA-OneVision, SmolVLM / Idefics3, Gemma 3, InternVL) is one new file with one
`Family` subclass, listed in `families()`; docs/architecture.md says what each method must do.
"""

from __future__ import annotations

import abc
import functools
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from alignti.data.batching import Batch
from alignti.data.images import ImageInputs
from alignti.errors import AlignTIError


@dataclass(frozen=True)
class ModelParts:
    """A model directory's tokenisation and image parts (`data.images.Processing`)."""

    family: Family
    tokenizer: PreTrainedTokenizerBase
    image_processor: Any  # the PIL-backend image processor (identical pixels with or without torchvision)
    chat_template: str | None
    image_token: str  # emitted once per image by the template, expanded to n_v copies
    settings: dict = field(default_factory=dict)  # the family's own (LLaVA: its processor and n_v)

    @property
    def image_token_id(self) -> int:
        return int(self.tokenizer.convert_tokens_to_ids(self.image_token))

    def encode_images(self, images: Sequence[Image.Image]) -> ImageInputs:
        return self.family.encode_images(self, images)

    def vision_tokens(self, size: tuple[int, int] | None) -> int | None:
        return self.family.vision_tokens(self, size)

    def save(self, out: str | Path) -> None:
        """Tokenizer, chat template and processor files, loadable by `load_parts` and transformers."""
        self.family.save_parts(self, Path(out))


class Family(abc.ABC):
    """One model family. The non-abstract methods' defaults suit LLaVA-style models."""

    name: str = ""
    model_types: tuple[str, ...] = ()  # config.model_type values this family handles
    vision_keys: tuple[str, ...] = ("vision_tower", "vision_model")  # parameter-name parts of the tower
    projector_keys: tuple[str, ...] = ("multi_modal_projector", "mm_projector")

    # ---- parts and images

    @abc.abstractmethod
    def load_parts(self, path: Path, trust_remote_code: bool = False) -> ModelParts:
        """The directory's parts; AlignTIError naming what is missing."""

    @abc.abstractmethod
    def encode_images(self, parts: ModelParts, images: Sequence[Image.Image]) -> ImageInputs:
        """Decoded RGB images (any sizes) -> the model's image inputs, per-image n_v and token grids."""

    @abc.abstractmethod
    def vision_tokens(self, parts: ModelParts, size: tuple[int, int] | None) -> int | None:
        """n_v of an image of `size` (width, height), or with None the fixed count (None if it varies)."""

    @abc.abstractmethod
    def save_parts(self, parts: ModelParts, out: Path) -> None:
        """Write the parts beside a model's weights."""

    @abc.abstractmethod
    def vision_rule(self, root: Path) -> tuple[dict | None, int | None]:
        """(the settings that decide every image's n_v, the fixed n_v or None), (None, None) without
        an image processor. Teacher and student with equal settings give every image the same n_v."""

    @abc.abstractmethod
    def random_spec(self, sizes: dict[str, Any]) -> Any:
        """The family's tiny-model spec from `assemble --random`'s size options by name (it takes the
        ones it has); AlignTIError for sizes it cannot build."""

    @abc.abstractmethod
    def build_random(self, spec: Any, tokenizer: PreTrainedTokenizerBase) -> tuple[PreTrainedModel, ModelParts]:
        """A tiny random-weight model (fp32, eval mode) of `random_spec`'s spec and its parts."""

    # ---- the model

    def decoder(self, model: PreTrainedModel) -> torch.nn.Module:
        """The vision + language base model whose forward gives hidden states (no logits)."""
        return model.model

    def lm_head(self, model: PreTrainedModel) -> torch.nn.Module:
        return model.get_output_embeddings()

    def plain_positions(self, model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                        images: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """Position ids of a padded batch (input_ids / attention_mask [B, T], `Batch.images`); None when
        the model numbers the tokens itself (1-D positions from the mask)."""
        return None

    def ribbon_positions(self, plain: torch.Tensor | None, index: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Positions of a ribbon / candidate pass whose slot w stands for original position index[b, w]
        (`Ribbon.position_ids`, `CandidatePass.position_ids`) of the right-padded batch whose
        `plain_positions` are `plain`; lengths: long [B] ground-truth lengths. 1-D: the index itself."""
        return index

    def generation_inputs(self, model: PreTrainedModel, batch: Batch) -> dict[str, torch.Tensor]:
        """`generate` keyword arguments for a left-padded batch on the model's device."""
        return {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask, **batch.images}

    def part_of(self, name: str) -> str:
        """"vision", "projector" or "llm" for a parameter name (`distill --train`)."""
        if any(k in name for k in self.projector_keys):
            return "projector"
        return "vision" if any(k in name for k in self.vision_keys) else "llm"


def decoder_hidden(model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   images: dict[str, torch.Tensor], position_ids: torch.Tensor | None = None,
                   **kwargs: Any) -> torch.Tensor:
    """Final hidden states [B, T, H] of the decoder over a padded batch, positions as its family numbers
    them unless given (`ribbon_positions` for a ribbon). kwargs: cache, use_cache."""
    family = family_of(model.config)
    if position_ids is None:
        position_ids = family.plain_positions(model, input_ids, attention_mask, images)
    return family.decoder(model)(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                 **images, **kwargs)[0]


@functools.cache
def families() -> dict[str, Family]:
    """Every family by name (imported here, not at module load: the family files import this one)."""
    from alignti.models.llava import LLAVA
    from alignti.models.qwen_vl import QWEN_VL

    return {f.name: f for f in (LLAVA, *QWEN_VL)}


def get_family(name: str) -> Family:
    """The family called `name`; AlignTIError listing the known ones."""
    if name not in families():
        raise AlignTIError(f"unknown model family {name!r}; use one of {', '.join(families())}")
    return families()[name]


def family_of(config: PretrainedConfig | dict) -> Family:
    """The family of a model config (or its config.json dict), by model_type. Types no family names
    are treated as LLaVA-style (a fixed-grid processor with `patch_size`: remote-code models)."""
    model_type = config.get("model_type") if isinstance(config, dict) else config.model_type
    for family in families().values():
        if model_type in family.model_types:
            return family
    return families()["llava"]


def config_dict(path: str | Path) -> dict:
    """A model directory's config.json; AlignTIError if it is not a saved model."""
    p = Path(path) / "config.json"
    if not p.is_file():
        raise AlignTIError(f"model directory {str(Path(path))!r} has no config.json (not a saved model)")
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise AlignTIError(f"cannot read {str(p)!r}: {e}") from None


def load_parts(path: str | Path, trust_remote_code: bool = False) -> ModelParts:
    """The model directory's parts, loaded by its family (extraction, distillation and evaluation all
    come here, so teacher and student see identical pixels and tokenisation)."""
    return family_of(config_dict(path)).load_parts(Path(path), trust_remote_code)


def saved_chat_template(root: Path) -> Any:
    """The processor-level template as transformers stores it (jinja file, json, or inline), else None."""
    if (root / "chat_template.jinja").is_file():
        return (root / "chat_template.jinja").read_text(encoding="utf-8")
    for name in ("chat_template.json", "processor_config.json"):
        if (root / name).is_file():
            try:
                found = json.loads((root / name).read_text(encoding="utf-8")).get("chat_template")
            except (OSError, json.JSONDecodeError) as e:
                raise AlignTIError(f"cannot read {str(root / name)!r}: {e}") from None
            if found:
                return found
    return None


def save_model_dir(model: PreTrainedModel, parts: ModelParts, out: str | Path) -> Path:
    """Weights (safetensors), config and the parts in one directory."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    parts.save(out)
    return out
