"""Device and dtype names as the commands accept them, checked without importing torch.

The config dataclasses are the CLI and must not import torch (`alignti --help` stays instant), so
they check the names here when they are parsed; `models.loading` turns a checked name into a
torch device string or dtype.
"""

from __future__ import annotations

import re

from alignti.errors import AlignTIError

DTYPE_NAMES = ("auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16")
_DEVICE_RE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def check_device(name: str, option: str = "--device", index: bool = True) -> str:
    """`name` if it is auto, cpu, cuda or (with `index`) cuda:N; else an AlignTIError naming `option`."""
    if not _DEVICE_RE.match(name) or (not index and ":" in name):
        forms = "auto, cpu, cuda or cuda:N" if index else "auto, cpu or cuda (pick GPUs with CUDA_VISIBLE_DEVICES)"
        raise AlignTIError(f"{option} must be {forms}, got {name!r}")
    return name


def check_dtype(name: str, option: str = "--dtype") -> str:
    """`name` if it is one of DTYPE_NAMES; else an AlignTIError naming `option`."""
    if name not in DTYPE_NAMES:
        raise AlignTIError(f"{option} must be one of {', '.join(DTYPE_NAMES)}, got {name!r}")
    return name
