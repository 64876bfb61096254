"""`alignti assemble` options, torch-free (the CLI reads them; `alignti.models.assemble` runs them)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from alignti.models.specs import FAMILY_NAMES, QwenVLSpec, TinySpec

_TINY = {f.name: f for f in fields(TinySpec)}
_QWEN = {f.name: f for f in fields(QwenVLSpec)}
# Options of one family only; the other sizes are shared (each family takes the fields it has).
_ONLY = {"text_family": "llava", "image_size": "llava", "min_pixels": "qwen*", "max_pixels": "qwen*"}


def _tiny_field(name: str) -> Any:
    """An AssembleConfig field with the tiny spec's default and help (used by --random only)."""
    f = _TINY.get(name) or _QWEN[name]
    only = f", {_ONLY[name]} only" if name in _ONLY else ""
    return field(default=f.default, metadata={"help": f"{f.metadata['help']} (--random{only})"})


@dataclass(frozen=True)
class AssembleConfig:
    """Options of `alignti assemble`; field names are the CLI option names."""

    out: str = field(metadata={"help": "output model directory"})
    llm: str | None = field(default=None, metadata={"help": "local pretrained causal LM directory"})
    vision: str | None = field(default=None, metadata={"help": "local SigLIP or CLIP (vision) model directory"})
    projector: str = field(default="mlp2x_gelu", metadata={"help": "projector type: mlp2x_gelu"})
    random: bool = field(default=False, metadata={"help": "build a tiny random model instead of --llm/--vision"})
    family: str = field(default="llava", metadata={
        "help": "model family of --random: llava (vision tower + projector + LM) or qwen2_vl | qwen2_5_vl | "
                "qwen3_vl (dynamic resolution, M-RoPE); --llm/--vision build llava", "choices": FAMILY_NAMES})
    text_family: str = _tiny_field("text_family")
    hidden: int = _tiny_field("hidden")
    layers: int = _tiny_field("layers")
    heads: int = _tiny_field("heads")
    kv_heads: int = _tiny_field("kv_heads")
    vision_hidden: int = _tiny_field("vision_hidden")
    vision_layers: int = _tiny_field("vision_layers")
    image_size: int = _tiny_field("image_size")
    patch: int = _tiny_field("patch")
    min_pixels: int = _tiny_field("min_pixels")
    max_pixels: int = _tiny_field("max_pixels")
    corpus: str | None = field(
        default=None, metadata={"help": "LLaVA JSON/JSONL corpus to train the tokenizer on (--random)"})
    tokenizer_from: str | None = field(
        default=None, metadata={"help": "model directory whose tokenizer to reuse, e.g. the teacher's (--random)"})
    vocab_size: int = field(default=1024, metadata={"help": "tokenizer vocabulary size with --corpus"})
    seed: int = field(default=0, metadata={"help": "seed for random weights, the projector and new embedding rows"})
    overwrite: bool = field(default=False, metadata={"help": "replace an existing non-empty --out directory"})

    def sizes(self) -> dict[str, Any]:
        """The size options of the tiny specs (each family's `random_spec` takes the fields it has)."""
        return {name: getattr(self, name) for name in (*_TINY, *_QWEN) if hasattr(self, name) and name != "family"}
