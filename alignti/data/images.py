"""Images as a model family's processor prepares them, and what the tokenisation path needs of a model.

The data layer never branches on the model family: a family adapter (`alignti.models.family`)
implements `Processing` and returns `ImageInputs`, and `data/encode.py` / `data/batching.py` only
concatenate, count and move them.

Every family's image tensors concatenate along dim 0 over the images of a batch, in order
(LLaVA: `pixel_values` [n, 3, H, W]; Qwen-VL: flattened patches `pixel_values` [sum_i t_i h_i w_i, D]
plus `image_grid_thw` [n, 3]), so collation is one rule for all of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from PIL import Image
from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True)
class ImageInputs:
    """The model inputs of one or more images, plus what the token layout needs of them."""

    tensors: dict[str, torch.Tensor]  # the model's image keyword arguments, each [n_images * ..., ...]
    n_v: tuple[int, ...]  # vision tokens per image
    grids: tuple[tuple[int, ...], ...]  # per image: the vision tokens' (rows, cols), row-major

    @staticmethod
    def concat(items: Sequence[ImageInputs]) -> ImageInputs | None:
        """One batch's images, in order (None when there are none)."""
        if not items:
            return None
        keys = {tuple(sorted(i.tensors)) for i in items}
        if len(keys) != 1:
            raise ValueError(f"images with different tensor names {sorted(keys)}")
        tensors = {k: torch.cat([i.tensors[k] for i in items]) for k in items[0].tensors}
        return ImageInputs(tensors, sum((i.n_v for i in items), ()), sum((i.grids for i in items), ()))


def move_images(tensors: dict[str, torch.Tensor], device: str | torch.device,
                dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Image keyword arguments on `device`; only floating tensors (pixels) take `dtype`, never ids or grids."""
    return {k: v.to(device=device, dtype=dtype if dtype is not None and v.is_floating_point() else v.dtype)
            for k, v in tensors.items()}


class Processing(Protocol):
    """What `SampleEncoder` needs of a model directory (`alignti.models.family.ModelParts` implements it)."""

    tokenizer: PreTrainedTokenizerBase
    chat_template: str | None
    image_token: str  # the token the template emits once per image (expanded to n_v copies)

    def encode_images(self, images: Sequence[Image.Image]) -> ImageInputs:
        """Resize, normalise and patchify decoded RGB images (any sizes)."""
        ...

    def vision_tokens(self, size: tuple[int, int] | None) -> int | None:
        """Vision tokens of an image of `size` (width, height) without processing it; with None, the
        count if every image has the same one (a fixed grid), else None."""
        ...


def image_header_size(path: Path) -> tuple[int, int] | None:
    """(width, height) read from the file header (PIL decodes nothing here); None if unreadable."""
    try:
        with Image.open(path) as im:
            return im.size
    except Exception:  # PIL raises many types for corrupt files
        return None
