"""Load a vision-language model from a local directory, the same way everywhere.

Extraction, distillation and evaluation all load models here and their tokenisation and image
parts with `alignti.models.family.load_parts`, so teacher and student see identical pixels (PIL
image backend) and identical tokenisation.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForImageTextToText, PretrainedConfig, PreTrainedModel

from alignti.errors import AlignTIError

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(name: str, device: str) -> torch.dtype:
    """`auto` means bf16 on CUDA and fp32 elsewhere (CPU bf16 matmuls are slow and lossy)."""
    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    if name not in DTYPES:
        raise AlignTIError(f"unknown dtype {name!r}; use auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def resolve_device(name: str) -> str:
    """`auto` picks CUDA when present."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise AlignTIError(f"device {name!r} requested but CUDA is not available")
    return name


def _check_dir(path: str | Path, what: str) -> Path:
    p = Path(path)
    if not (p / "config.json").is_file():
        raise AlignTIError(f"{what} directory {str(p)!r} has no config.json (not a saved model)")
    return p


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
    model = AutoModelForImageTextToText.from_pretrained(
        p, dtype=dtype, attn_implementation=attn_implementation, trust_remote_code=trust_remote_code, **kw
    )
    return model.to(device).eval()


def load_config(path: str | Path, trust_remote_code: bool = False) -> PretrainedConfig:
    """The model's config alone (no weights loaded)."""
    return AutoConfig.from_pretrained(_check_dir(path, "model"), trust_remote_code=trust_remote_code)
