"""Ragged per-sample signals <-> one part's flat arrays + samples table.

Packing concatenates each array over the part's samples (ragged dim first) and records every
sample's start/count per group in the samples table; unpacking is the inverse for a selection.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from alignti.storage.encoding import (
    decode_logprobs_abs, decode_logprobs_delta, encode_logprobs_abs, encode_logprobs_delta,
)
from alignti.storage.schema import ARRAYS, GROUPS, SAMPLE_ARRAYS, SAMPLE_COLUMNS, CacheSettings, SampleSignals

_ARROW = {"string": pa.string(), "int32": pa.int32(), "int64": pa.int64(), "list<int32>": pa.list_(pa.int32())}


def stored_row_shape(name: str, settings: CacheSettings) -> tuple[int, ...]:
    """Shape of one row (all dims after the ragged one) of array `name` under `settings`."""
    dims = {"k": settings.top_k, "d": settings.tpa_d, "k_t": settings.tpa_top_k, "k_v": settings.iva_top_k}
    return tuple(dims[s] for s in SAMPLE_ARRAYS[name].shape[1:])


def encode_array(name: str, values: np.ndarray) -> np.ndarray:
    """SampleSignals dtype -> stored dtype."""
    enc = SAMPLE_ARRAYS[name].encoding
    if enc == "logprob_delta":
        return encode_logprobs_delta(values)
    if enc == "logprob_abs":
        return encode_logprobs_abs(values)
    if enc == "float16":
        return values.astype(np.float16)
    return values.astype(SAMPLE_ARRAYS[name].stored_dtype, copy=False)


def decode_array(name: str, stored: np.ndarray) -> np.ndarray:
    """Stored dtype -> SampleSignals dtype."""
    enc = SAMPLE_ARRAYS[name].encoding
    if enc == "logprob_delta":
        return decode_logprobs_delta(stored)
    if enc == "logprob_abs":
        return decode_logprobs_abs(stored)
    return stored.astype(SAMPLE_ARRAYS[name].dtype, copy=False)


def samples_schema() -> pa.Schema:
    return pa.schema([(name, _ARROW[typ]) for name, typ, _ in SAMPLE_COLUMNS])


def pack(samples: list[SampleSignals], settings: CacheSettings) -> tuple[dict[str, np.ndarray], pa.Table]:
    """Validated samples -> ({array name: stored flat array}, samples table)."""
    arrays: dict[str, np.ndarray] = {}
    for spec in ARRAYS:
        parts = [getattr(s, spec.name) for s in samples]
        flat = np.concatenate(parts, axis=0) if parts else np.zeros((0,) + stored_row_shape(spec.name, settings))
        arrays[spec.name] = encode_array(spec.name, flat.astype(spec.dtype, copy=False))
    cols: dict[str, list] = {
        "sample_id": [s.sample_id for s in samples], "source_id": [s.source_id for s in samples],
        "image_path": [s.image_path for s in samples], "image_sha256": [s.image_sha256 for s in samples],
        "n_v": [s.n_v for s in samples], "vision_start": [s.vision_start for s in samples],
        "text_ids": [s.text_ids for s in samples],
        "label_spans": [s.label_spans.reshape(-1) for s in samples],
    }
    first = {g: next(spec.name for spec in ARRAYS if spec.group == g) for g in GROUPS}
    for group, (count_col, start_col) in GROUPS.items():
        counts = np.array([getattr(s, first[group]).shape[0] for s in samples], dtype=np.int64)
        cols[count_col] = counts.astype(np.int32)
        cols[start_col] = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64) if len(counts) else counts
    schema = samples_schema()
    table = pa.table({name: pa.array(cols[name], type=schema.field(name).type) for name in schema.names},
                     schema=schema)
    return arrays, table


def row_selection(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """int64 [sum counts] row indices covering [start, start+count) for each sample, in order."""
    total = int(counts.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    offs = np.repeat(starts - np.concatenate([[0], np.cumsum(counts)[:-1]]), counts)
    return np.arange(total, dtype=np.int64) + offs


def unpack(meta: dict[str, list], arrays: dict[str, np.ndarray]) -> list[SampleSignals]:
    """Selected samples' metadata columns + their decoded rows (concatenated in sample order)."""
    n = len(meta["sample_id"])
    split: dict[str, list[np.ndarray]] = {}
    for spec in ARRAYS:
        counts = np.asarray(meta[GROUPS[spec.group][0]], dtype=np.int64)
        split[spec.name] = np.split(arrays[spec.name], np.cumsum(counts)[:-1]) if n else []
    out = []
    for i in range(n):
        out.append(SampleSignals(
            sample_id=meta["sample_id"][i], source_id=meta["source_id"][i], image_path=meta["image_path"][i],
            image_sha256=meta["image_sha256"][i],
            text_ids=np.array(meta["text_ids"][i], dtype=np.int32),  # copies: arrow buffers are read-only
            label_spans=np.array(meta["label_spans"][i], dtype=np.int32).reshape(-1, 2),
            n_v=int(meta["n_v"][i]), vision_start=int(meta["vision_start"][i]),
            **{name: np.ascontiguousarray(split[name][i]) for name in split}))
    return out
