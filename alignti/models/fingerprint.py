"""A model directory's fingerprint: stable sha256 hashes of what decides the teacher signals.

The cache stores the teacher's fingerprint, and distillation compares the student's
tokenizer and chat template with it, so every hash must be stable across save/reload and
process restarts, and each must change only with its own part:

- `config`: config.json as sorted-key JSON without volatile keys (`transformers_version`,
  `_name_or_path`, `_commit_hash`) and without `dtype`/`torch_dtype`, at any depth:
  transformers adds sub-config dtypes on a re-save, and the precision is already part of
  `weights` (every tensor's dtype is hashed), so `config` names the architecture alone.
- `weights`: every safetensors tensor's name, dtype, shape and raw bytes, read in chunks
  straight from the files (never loaded as tensors), combined in name order, so sharding and
  tensor order inside files do not matter.
- `tokenizer`: the loaded tokenizer's full backend definition (vocab, merges, added tokens,
  normalizer, pre-tokenizer, post-processor, decoder; without runtime padding/truncation
  settings) and its named special tokens. Template and file bookkeeping are not part of it.
- `chat_template`: the template the tokenisation path uses (the processor's, else the
  tokenizer's); None when there is none.
- `processor`: the image processor's settings plus the LLaVA processor's patch size, feature
  strategy, extra-token count and image token.
- `vision_grid`: the settings that decide each image's vision-token count, as the model's family
  states them (LLaVA: the processed image size, patch size, feature strategy, extra tokens;
  Qwen-VL: patch, merge, temporal patch, min_pixels, max_pixels); equal for teacher and student
  means every image gets the same n_v. `n_vision_tokens` is that count for fixed-grid families
  only; dynamic-resolution ones (Qwen-VL) have none: their n_v is per image, in the cache per sample.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from alignti.errors import AlignTIError
from alignti.models.family import family_of, saved_chat_template

FINGERPRINT_VERSION = 1
VOLATILE_CONFIG_KEYS = frozenset({"transformers_version", "_name_or_path", "_commit_hash", "dtype", "torch_dtype"})
PROCESSOR_KEYS = ("patch_size", "vision_feature_select_strategy", "num_additional_image_tokens", "image_token")
COMPAT_FIELDS = ("tokenizer", "chat_template")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model")
_CHUNK = 16 << 20  # bytes per read while hashing weights
_MAX_HEADER = 100 << 20  # a safetensors header larger than this is a corrupt file


def canonical_json(obj: Any) -> bytes:
    """Sorted keys, no whitespace, UTF-8: one byte string per value."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise AlignTIError(f"cannot read {str(path)!r}: {e}") from None


def _drop_keys(obj: Any, keys: frozenset[str]) -> Any:
    if isinstance(obj, dict):
        return {k: _drop_keys(v, keys) for k, v in obj.items() if k not in keys}
    if isinstance(obj, list):
        return [_drop_keys(v, keys) for v in obj]
    return obj


def fingerprint_model_dir(path: str | Path) -> dict:
    """Hashes and sizes of a saved model directory (see the module docstring).

    Returns {"version", "config", "weights", "tokenizer", "chat_template", "processor"
    (sha256 hex, or None where the part is absent), "vocab_size" (embedding rows),
    "tokenizer_size" (len(tokenizer), None without a tokenizer), "num_hidden_layers" (LM layers), and with an
    image processor "vision_grid" (sha256) plus, for fixed-grid families, "n_vision_tokens" (per image)}.
    """
    root = Path(path)
    if not (root / "config.json").is_file():
        raise AlignTIError(f"model directory {str(root)!r} has no config.json (not a saved model)")
    config = _read_json(root / "config.json")
    text_config = config.get("text_config") or config
    weights, shapes = hash_weights(root)
    tokenizer = _load_tokenizer(root)
    rule, n_v = family_of(config).vision_rule(root)
    vision = {} if rule is None else {"vision_grid": _sha(canonical_json(rule))}
    if n_v is not None:
        vision["n_vision_tokens"] = n_v
    return {
        "version": FINGERPRINT_VERSION,
        "config": _sha(canonical_json(_drop_keys(config, VOLATILE_CONFIG_KEYS))),
        "weights": weights,
        "tokenizer": tokenizer_hash(tokenizer) if tokenizer is not None else None,
        "chat_template": _chat_template_hash(root, tokenizer),
        "processor": _processor_hash(root),
        "vocab_size": _embedding_rows(shapes, text_config),
        "tokenizer_size": len(tokenizer) if tokenizer is not None else None,
        "num_hidden_layers": text_config.get("num_hidden_layers"),
        **vision,
    }


def tokenizer_compatible(a: dict, b: dict) -> str | None:
    """The first of `tokenizer`, `chat_template` on which fingerprints `a` and `b` differ, else None.

    A missing tokenizer is never compatible: nothing would guarantee the token ids agree.
    """
    if a.get("tokenizer") is None or b.get("tokenizer") is None:
        return "tokenizer"
    for name in COMPAT_FIELDS:
        if a.get(name) != b.get(name):
            return name
    return None


# ---------------------------------------------------------------- weights


def weight_files(root: Path) -> list[Path]:
    """The directory's safetensors weight files (an index's shards, or every *.safetensors): the one
    weights format alignti loads and fingerprints; AlignTIError when there are none."""
    index = root / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(_read_json(index).get("weight_map", {}).values()))
        files = [root / n for n in names]
    elif (root / "model.safetensors").is_file():
        files = [root / "model.safetensors"]
    else:
        files = sorted(root.glob("*.safetensors"))
    if not files:
        raise AlignTIError(f"model directory {str(root)!r} has no safetensors weights; pickled *.bin weights are "
                           f"refused: convert them to safetensors")
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise AlignTIError(f"weight shard {missing[0]!r} named in the index is missing")
    return files


def _safetensors_header(f, path: Path) -> tuple[int, dict]:
    """(offset of the data section, {name: {"dtype", "shape", "data_offsets"}})."""
    raw = f.read(8)
    n = struct.unpack("<Q", raw)[0] if len(raw) == 8 else -1
    if not 0 < n <= _MAX_HEADER:
        raise AlignTIError(f"{str(path)!r} is not a safetensors file (bad header)")
    try:
        header = json.loads(f.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise AlignTIError(f"{str(path)!r} has a corrupt safetensors header") from None
    header.pop("__metadata__", None)
    return 8 + n, header


def _hash_tensor(f, path: Path, base: int, name: str, meta: dict, size: int) -> str:
    start, end = meta["data_offsets"]
    if not 0 <= start <= end or base + end > size:
        raise AlignTIError(f"{str(path)!r} is truncated or corrupt (tensor {name!r} lies outside the file)")
    h = hashlib.sha256(canonical_json([name, meta["dtype"], meta["shape"]]))
    f.seek(base + start)
    left = end - start
    while left:
        chunk = f.read(min(_CHUNK, left))
        if not chunk:
            raise AlignTIError(f"{str(path)!r} is truncated (tensor {name!r})")
        h.update(chunk)
        left -= len(chunk)
    return h.hexdigest()


def hash_weights(root: str | Path) -> tuple[str, dict[str, list[int]]]:
    """(sha256 over all tensors in name order, {tensor name: shape}), streaming from disk."""
    digests: dict[str, str] = {}
    shapes: dict[str, list[int]] = {}
    for path in weight_files(Path(root)):
        size = path.stat().st_size
        with path.open("rb") as f:
            base, header = _safetensors_header(f, path)
            for name, meta in header.items():
                if name in digests:
                    raise AlignTIError(f"tensor {name!r} appears in more than one weight file")
                digests[name] = _hash_tensor(f, path, base, name, meta, size)
                shapes[name] = list(meta["shape"])
    lines = "".join(f"{name}\t{digests[name]}\n" for name in sorted(digests))
    return _sha(lines.encode("utf-8")), shapes


def _embedding_rows(shapes: dict[str, list[int]], text_config: dict) -> int | None:
    """Rows of the LM's input embedding in the weights (padded vocab), else the config's vocab_size."""
    names = sorted(n for n in shapes if n.endswith("embed_tokens.weight"))
    return shapes[names[0]][0] if names else text_config.get("vocab_size")


# ---------------------------------------------------------------- tokenizer, template, processor


def _load_tokenizer(root: Path) -> PreTrainedTokenizerBase | None:
    """The directory's tokenizer; None when it has no tokenizer files (a weights-only checkpoint)."""
    if not any((root / name).is_file() for name in TOKENIZER_FILES):
        return None
    try:
        return AutoTokenizer.from_pretrained(root, trust_remote_code=False)  # never prompt, never run its code
    except (OSError, ValueError) as e:
        raise AlignTIError(f"cannot load the tokenizer of {str(root)!r}: {_one_line(e)}") from None


def tokenizer_hash(tokenizer: PreTrainedTokenizerBase) -> str:
    """sha256 of what decides token ids and special tokens, not of how the files are written."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        definition = json.loads(backend.to_str())
        definition.pop("truncation", None)  # runtime call settings, not the vocabulary
        definition.pop("padding", None)
    else:  # a Python-only tokenizer: its vocabulary and added tokens say the same
        definition = {
            "vocab": sorted(tokenizer.get_vocab().items()),
            "added": sorted((i, str(t)) for i, t in tokenizer.added_tokens_decoder.items()),
        }
    special = {k: str(v) for k, v in tokenizer.special_tokens_map.items()}
    return _sha(canonical_json({"backend": definition, "special": special}))


def _chat_template_hash(root: Path, tokenizer: PreTrainedTokenizerBase | None) -> str | None:
    template = saved_chat_template(root) or getattr(tokenizer, "chat_template", None)
    extra_dir = root / "additional_chat_templates"
    if extra_dir.is_dir():  # named templates saved beside the default one
        named = {p.stem: p.read_text(encoding="utf-8") for p in sorted(extra_dir.glob("*.jinja"))}
        template = {"default": template, **named}
    if not template:
        return None
    return _sha(template.encode("utf-8") if isinstance(template, str) else canonical_json(template))


def _processor_hash(root: Path) -> str | None:
    """Hash of the processor settings, None for text-only dirs."""
    proc = _read_json(root / "processor_config.json") if (root / "processor_config.json").is_file() else {}
    legacy = root / "preprocessor_config.json"
    image_cfg = proc.get("image_processor") or (_read_json(legacy) if legacy.is_file() else None)
    if image_cfg is None:
        return None
    return _sha(canonical_json({"image_processor": image_cfg, **{k: proc.get(k) for k in PROCESSOR_KEYS}}))
