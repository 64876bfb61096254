"""A bounded in-memory store of built examples, so later epochs skip decoding, encoding and cache
reads (about two thirds of a tiny student's step time on the demo, `docs/results.md`).

Examples are kept in arrival order until the byte budget is spent, then no more are added
(no eviction: with random epoch order any evicted entry is as likely to be needed next as any
kept one, so keeping the first ones costs nothing and needs no bookkeeping). Entries are shared
objects: callers must not modify them (collate copies into new tensors).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch


def nbytes(obj: Any) -> int:
    """Bytes of the tensors and arrays an example holds (through nested dataclass fields and dicts)."""
    if isinstance(obj, dict):
        return sum(nbytes(v) for v in obj.values())
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, np.ndarray):
        return int(obj.nbytes)
    if dataclasses.is_dataclass(obj):
        return sum(nbytes(getattr(obj, f.name)) for f in dataclasses.fields(obj))
    return 0


class ExampleMemo:
    """index -> example, up to `budget_bytes` of tensor data."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget, self.used = budget_bytes, 0
        self._items: dict[int, Any] = {}

    def __contains__(self, i: int) -> bool:
        return i in self._items

    def __getitem__(self, i: int) -> Any:
        return self._items[i]

    def __len__(self) -> int:
        return len(self._items)

    def has_room(self) -> bool:
        return self.used < self.budget

    def put(self, i: int, example: Any) -> None:
        size = nbytes(example)
        if i not in self._items and self.used + size <= self.budget:
            self._items[i] = example
            self.used += size
