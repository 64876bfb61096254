"""Length-grouped batching and padding of encoded samples.

Grouping by length inside a bounded buffer keeps padding low without reading the whole
corpus first, so extraction can stream a corpus of any size.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from alignti.data.encode import IGNORE_INDEX, EncodedSample
from alignti.data.images import ImageInputs, move_images


@dataclass(frozen=True)
class Batch:
    """Padded batch. `offsets[b]` is added to sample b's own positions (left padding shifts them)."""

    input_ids: torch.Tensor  # int64 [B, T]
    attention_mask: torch.Tensor  # int64 [B, T]
    labels: torch.Tensor  # int64 [B, T]
    images: dict[str, torch.Tensor]  # the model's image keyword arguments, samples with images in order ({} if none)
    offsets: torch.Tensor  # int64 [B]
    samples: tuple[EncodedSample, ...]

    def to(self, device: str | torch.device, dtype: torch.dtype | None = None) -> "Batch":
        """On `device`; `dtype` applies to floating image tensors (pixels) only, never to ids or grids."""
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device),
                     move_images(self.images, device, dtype),
                     self.offsets.to(device), self.samples)


def collate(samples: list[EncodedSample], pad_id: int, padding_side: str = "right") -> Batch:
    """Pad to the longest sample; right padding for training/extraction, left for generation."""
    T = max(s.length for s in samples)
    B = len(samples)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.long)
    offsets = torch.zeros(B, dtype=torch.long)
    for b, s in enumerate(samples):
        start = T - s.length if padding_side == "left" else 0
        input_ids[b, start:start + s.length] = s.input_ids
        labels[b, start:start + s.length] = s.labels
        mask[b, start:start + s.length] = 1
        offsets[b] = start
    images = ImageInputs.concat([s.images for s in samples if s.images is not None])
    return Batch(input_ids, mask, labels, images.tensors if images else {}, offsets, tuple(samples))


def length_grouped(
    samples: Iterable[EncodedSample], batch_size: int, buffer_batches: int = 16, shuffle: bool = False,
    seed: int = 0,
) -> Iterator[list[EncodedSample]]:
    """Batches of similar length: fill a buffer, sort it by length, cut it into batches.

    With `shuffle`, the batch order inside each buffer is shuffled (seeded) so training does not
    see lengths in increasing order.
    """
    rng = random.Random(seed)
    buf: list[EncodedSample] = []
    for s in samples:
        buf.append(s)
        if len(buf) >= batch_size * buffer_batches:
            yield from _cut(buf, batch_size, shuffle, rng)
            buf = []
    if buf:
        yield from _cut(buf, batch_size, shuffle, rng)


def _cut(buf: list[EncodedSample], batch_size: int, shuffle: bool, rng: random.Random) -> Iterator[list[EncodedSample]]:
    ordered = sorted(buf, key=lambda s: s.length)
    batches = [ordered[i:i + batch_size] for i in range(0, len(ordered), batch_size)]
    if shuffle:
        rng.shuffle(batches)
    yield from batches
