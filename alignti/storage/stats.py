"""Cache statistics for `alignti inspect` and bench/cache_size.py: counts, bytes, retained mass."""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np

from alignti.storage.catalog import part_file_sizes
from alignti.storage.reader import CacheReader
from alignti.storage.schema import CACHE_JSON, REJECTS_PARQUET, SAMPLE_ARRAYS, SIGNALS_ZARR, CacheSettings

SIGNALS = ("topk", "tpa", "iva_saliency", "iva_topk", "metadata", "rejects")


def signal_of(rel: str) -> str:
    """Accounting bucket of a file inside a part (path relative to the part dir)."""
    if rel == REJECTS_PARQUET:
        return "rejects"
    bits = rel.split("/")
    if bits[0] == SIGNALS_ZARR and len(bits) > 2 and bits[1] in SAMPLE_ARRAYS:
        return SAMPLE_ARRAYS[bits[1]].signal
    return "metadata"  # samples.parquet, part.json, group zarr.json


def signal_bytes(reader: CacheReader) -> tuple[dict[str, int], int]:
    """({signal: bytes over committed parts}, bytes_total incl. part.json files and cache.json)."""
    loc = reader.loc
    out = Counter({s: 0 for s in SIGNALS})
    total = int(loc.fs.size(loc.path(CACHE_JSON)))
    for p in reader.parts:
        for rel, size in part_file_sizes(loc, p.name).items():
            out[signal_of(rel)] += size
            total += size
    return dict(out), total


def raw_bytes(reader: CacheReader) -> dict[str, int]:
    """Bytes the signals would take as plain int32 ids + fp16 log-probs/weights (+ int32 positions)."""
    s: CacheSettings = reader.manifest.settings
    rows = {g: sum(p.rows.get(g, 0) for p in reader.parts) for g in ("resp", "tpa", "sal", "iva")}
    return {"topk": rows["resp"] * (4 + 6 * s.top_k),
            "tpa": rows["tpa"] * (4 + 6 * s.tpa_d + 6 * s.tpa_d * s.tpa_top_k),
            "iva_saliency": rows["sal"] * 2, "iva_topk": rows["iva"] * (4 + 6 * s.iva_top_k)}


def retained_mass(reader: CacheReader, max_samples: int, seed: int = 0) -> dict[str, Any]:
    """Mean teacher probability mass kept by the top-k rows, over up to `max_samples` samples."""
    n = min(len(reader), max_samples)
    if n == 0:
        return {"mass_samples": 0, "mean_topk_mass": None, "mean_tpa_topk_mass": None, "mean_iva_topk_mass": None}
    idx = np.sort(np.random.default_rng(seed).choice(len(reader), size=n, replace=False))
    sums: dict[str, list[np.ndarray]] = {"topk": [], "tpa": [], "iva": []}
    for start in range(0, n, 64):
        for s in reader.get_batch(idx[start:start + 64]):
            sums["topk"].append(np.exp(s.topk_logprobs.astype(np.float64)).sum(-1).ravel())
            sums["tpa"].append(np.exp(s.tpa_topk_logprobs.astype(np.float64)).sum(-1).ravel())
            sums["iva"].append(np.exp(s.iva_topk_logprobs.astype(np.float64)).sum(-1).ravel())

    def mean(v: list[np.ndarray]) -> float | None:
        a = np.concatenate(v) if v else np.zeros(0)
        return float(a.mean()) if a.size else None

    return {"mass_samples": n, "mean_topk_mass": mean(sums["topk"]), "mean_tpa_topk_mass": mean(sums["tpa"]),
            "mean_iva_topk_mass": mean(sums["iva"])}


def _per_token(values: dict[str, int], tokens: int) -> dict[str, float | None]:
    out: dict[str, float | None] = {k: (v / tokens if tokens else None) for k, v in values.items()}
    out["total"] = sum(values.values()) / tokens if tokens else None
    return out


def cache_stats(reader: CacheReader, mass_samples: int = 256) -> dict[str, Any]:
    """Everything `alignti inspect --json` prints (one JSON-serialisable dict)."""
    m = reader.manifest
    rejects = reader.rejects()
    by_signal, total = signal_bytes(reader)
    raw = raw_bytes(reader)
    tokens = reader.num_response_tokens
    s = m.settings
    return {
        "cache": reader.loc.url, "schema_version": m.schema_version, "created_by": m.created_by,
        "num_samples": len(reader), "num_duplicates": reader.num_duplicates, "num_parts": len(reader.parts),
        "workers": sorted({p.worker for p in reader.parts}),
        "num_response_tokens": tokens,
        "num_tpa_rows": sum(p.rows.get("tpa", 0) for p in reader.parts),
        "num_iva_positions": sum(p.rows.get("iva", 0) for p in reader.parts),
        "num_rejects": len(rejects), "rejects_by_reason": dict(Counter(r["reason"] for r in rejects).most_common()),
        "bytes_total": total, "bytes_per_signal": by_signal,
        "bytes_per_response_token": _per_token(by_signal, tokens),
        "raw_bytes_per_response_token": _per_token(raw, tokens),
        **retained_mass(reader, mass_samples),
        "settings": s.to_dict(),
        "iva": {"layer": s.iva_layer, "max_positions": s.iva_max_positions, "top_k": s.iva_top_k,
                "irs_scores": s.irs_scores},
        "teacher_fingerprint": m.teacher_fingerprint,
        "encoding": m.encoding,
    }
