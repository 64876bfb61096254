"""Load a vision-language model from a local directory, the same way everywhere.

Extraction, distillation and evaluation all load models here and their tokenisation and image
parts with `alignti.models.family.load_parts`, so teacher and student see identical pixels (PIL
image backend) and identical tokenisation.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import AutoConfig, AutoModelForImageTextToText, PretrainedConfig, PreTrainedModel

from alignti.errors import AlignTIError
from alignti.models.devices import DTYPE_NAMES, check_device, check_dtype
from alignti.models.fingerprint import weight_files

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
assert set(DTYPES) == set(DTYPE_NAMES) - {"auto"}


def resolve_dtype(name: str, device: str) -> torch.dtype:
    """`auto` means bf16 on CUDA and fp32 elsewhere (CPU bf16 matmuls are slow and lossy)."""
    if check_dtype(name) == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return DTYPES[name]


def resolve_device(name: str) -> str:
    """`auto` picks CUDA when present."""
    if check_device(name) == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise AlignTIError(f"device {name!r} requested but CUDA is not available")
    return name


def _check_dir(path: str | Path, what: str) -> Path:
    p = Path(path)
    if not (p / "config.json").is_file():
        raise AlignTIError(f"{what} directory {str(p)!r} has no config.json (not a saved model)")
    return p


@contextlib.contextmanager
def _refusals(p: Path) -> Iterator[None]:
    """transformers' refusals to load a directory, as one line saying what to do: a config whose
    code lives in the directory (auto_map) without trust_remote_code, an architecture transformers
    does not know. (Pickled weights never reach transformers: `load_model` reads safetensors only.)"""
    try:
        yield
    except SafetensorError as e:  # a truncated or corrupt weights file
        raise AlignTIError(f"model directory {str(p)!r}: its safetensors weights cannot be read ({e})") from None
    except ValueError as e:
        if "trust_remote_code" in str(e):
            raise AlignTIError(f"model directory {str(p)!r} needs its own Python code to load (auto_map in "
                               f"config.json); alignti runs it only with --trust-remote-code (alignti eval), "
                               f"use a model transformers implements otherwise") from None
        if "does not recognize this architecture" in str(e):
            raise AlignTIError(f"model directory {str(p)!r}: transformers does not know its model_type; "
                               f"upgrade transformers or use another model") from None
        raise


def load_model(
    path: str | Path,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    attn_implementation: str | dict | None = "sdpa",
    trust_remote_code: bool = False,
    text_layers: int | None = None,
) -> PreTrainedModel:
    """The model in eval mode on `device`.

    `text_layers` keeps only the first N decoder layers of the LM (weights of the others are
    never loaded): the vLLM backend's saliency model needs the layers up to the IVA layer only.
    """
    p = _check_dir(path, "model")
    weight_files(p)  # safetensors only: pickled weights never reach transformers
    kw = {}
    if text_layers is not None:
        config = load_config(p, trust_remote_code)
        text = config.get_text_config()
        if not 1 <= text_layers <= text.num_hidden_layers:
            raise ValueError(f"cannot keep {text_layers} of the model's {text.num_hidden_layers} LM layers")
        text.num_hidden_layers = text_layers
        if getattr(text, "layer_types", None) is not None:  # per-layer attention kinds must match the count
            text.layer_types = text.layer_types[:text_layers]
        kw["config"] = config
    with _refusals(p):
        model = AutoModelForImageTextToText.from_pretrained(
            p, dtype=dtype, attn_implementation=attn_implementation, trust_remote_code=trust_remote_code, **kw
        )
    return model.to(device).eval()


def load_config(path: str | Path, trust_remote_code: bool = False) -> PretrainedConfig:
    """The model's config alone (no weights loaded)."""
    p = _check_dir(path, "model")
    with _refusals(p):
        return AutoConfig.from_pretrained(p, trust_remote_code=trust_remote_code)
