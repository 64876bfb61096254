"""Checks a SampleSignals against the schema and the cache settings before it is written.

A sample that fails is a bug in the producer (extract), so this raises ValueError naming the
sample and field; nothing of that sample is written.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from alignti.storage.schema import ARRAYS, SAMPLE_ARRAYS, CacheSettings, SampleSignals

_STR_FIELDS = ("sample_id", "source_id", "image_path", "image_sha256")


def _fixed_dims(settings: CacheSettings) -> dict[str, int]:
    return {"k": settings.top_k, "d": settings.tpa_d, "k_t": settings.tpa_top_k,
            "k_v": settings.iva_top_k, "2": 2}


def _cast(sample_id: str, name: str, value: object) -> np.ndarray:
    spec = SAMPLE_ARRAYS[name]
    arr = np.asarray(value)
    want = np.dtype(spec.dtype)
    if want.kind == "i":
        if arr.size and arr.dtype.kind not in "iu":
            raise ValueError(f"sample {sample_id}: {name} must be integer, got {arr.dtype}")
        if arr.size and (arr.min() < np.iinfo(want).min or arr.max() > np.iinfo(want).max):
            raise ValueError(f"sample {sample_id}: {name} values do not fit {want}")
    elif arr.size and arr.dtype.kind not in "fiu":
        raise ValueError(f"sample {sample_id}: {name} must be floating point, got {arr.dtype}")
    return np.ascontiguousarray(arr, dtype=want)


def _check_shapes(sample_id: str, arrays: dict[str, np.ndarray], settings: CacheSettings) -> dict[str, int]:
    dims = _fixed_dims(settings)
    for name, arr in arrays.items():
        spec = SAMPLE_ARRAYS[name]
        if arr.ndim != len(spec.shape):
            raise ValueError(f"sample {sample_id}: {name} must have shape {list(spec.shape)}, got {arr.shape}")
        for sym, size in zip(spec.shape, arr.shape):
            if dims.setdefault(sym, size) != size:
                raise ValueError(f"sample {sample_id}: {name} has {sym}={size}, expected {dims[sym]} "
                                 f"(shape {list(spec.shape)}, got {arr.shape})")
    return dims


def _check_logprobs(sample_id: str, name: str, lp: np.ndarray, sorted_desc: bool) -> None:
    if np.isnan(lp).any() or (lp > 1e-3).any() or np.isposinf(lp).any():
        raise ValueError(f"sample {sample_id}: {name} must be log-probs (<= 0, no NaN)")
    if sorted_desc and lp.shape[-1] > 1:
        with np.errstate(invalid="ignore"):  # -inf - -inf
            steps = np.diff(lp, axis=-1)
        if (steps > 0).any():
            raise ValueError(f"sample {sample_id}: {name} rows must be sorted by descending log-prob")


def _check_ascending(sample_id: str, name: str, a: np.ndarray, lo: int, hi: int | None) -> None:
    if a.size == 0:
        return
    if (np.diff(a) <= 0).any():
        raise ValueError(f"sample {sample_id}: {name} must be strictly ascending")
    if a[0] < lo or (hi is not None and a[-1] >= hi):
        raise ValueError(f"sample {sample_id}: {name} values must lie in [{lo}, {hi})")


def _check_ranges(s: SampleSignals, a: dict[str, np.ndarray], dims: dict[str, int], settings: CacheSettings,
                  vocab_size: int | None) -> None:
    sid = s.sample_id
    _check_ascending(sid, "resp_positions", a["resp_positions"], 0, None)
    _check_ascending(sid, "tpa_rows", a["tpa_rows"], 0, dims["N_r"])
    if settings.tpa_max_positions is not None and dims["N_c"] > settings.tpa_max_positions:
        raise ValueError(f"sample {sid}: {dims['N_c']} TPA rows > tpa_max_positions {settings.tpa_max_positions}")
    if dims["P"] > settings.iva_max_positions:
        raise ValueError(f"sample {sid}: {dims['P']} IVA positions > iva_max_positions {settings.iva_max_positions}")
    if dims["n_s"] not in (0, s.n_v):
        raise ValueError(f"sample {sid}: saliency has {dims['n_s']} weights, expected n_v={s.n_v} or 0")
    pos = a["iva_positions"]
    if pos.size and (pos.min() < 0 or pos.max() >= dims["n_s"] or np.unique(pos).size != pos.size):
        raise ValueError(f"sample {sid}: iva_positions must be distinct indices in [0, {dims['n_s']})")
    sal = a["saliency"]
    if sal.size and (not np.isfinite(sal).all() or (sal < 0).any()):
        raise ValueError(f"sample {sid}: saliency must be finite and >= 0")
    spans = a["label_spans"]
    if spans.size and ((spans[:, 0] >= spans[:, 1]).any() or spans.min() < 0):
        raise ValueError(f"sample {sid}: label_spans must be non-empty [start, end) ranges")
    for name in ("text_ids", "topk_ids", "tpa_cand_ids", "tpa_topk_ids", "iva_topk_ids"):
        ids = a[name]
        if ids.size and (ids.min() < 0 or (vocab_size is not None and name != "text_ids" and ids.max() >= vocab_size)):
            raise ValueError(f"sample {sid}: {name} must be token ids in [0, {vocab_size})")


def validate_sample(s: SampleSignals, settings: CacheSettings, vocab_size: int | None = None) -> SampleSignals:
    """Return `s` with arrays cast to the schema dtypes; ValueError naming the problem otherwise."""
    for name in _STR_FIELDS:
        if not isinstance(getattr(s, name), str):
            raise ValueError(f"sample {s.sample_id!r}: {name} must be a str")
    if not s.sample_id:
        raise ValueError(f"sample from source {s.source_id!r} has an empty sample_id")
    if int(s.n_v) < 0 or int(s.vision_start) < -1:
        raise ValueError(f"sample {s.sample_id}: n_v must be >= 0 and vision_start >= -1")
    names = [spec.name for spec in ARRAYS] + ["text_ids", "label_spans"]
    arrays = {n: _cast(s.sample_id, n, getattr(s, n)) for n in names}
    if arrays["label_spans"].size == 0:
        arrays["label_spans"] = arrays["label_spans"].reshape(0, 2)
    dims = _check_shapes(s.sample_id, arrays, settings)
    for spec in ARRAYS:
        if spec.encoding.startswith("logprob"):
            _check_logprobs(s.sample_id, spec.name, arrays[spec.name], spec.encoding == "logprob_delta")
    _check_ranges(s, arrays, dims, settings, vocab_size)
    return dataclasses.replace(s, n_v=int(s.n_v), vision_start=int(s.vision_start), **arrays)
