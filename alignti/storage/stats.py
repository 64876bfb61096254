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


MASS_WARN = 0.8  # below this mean retained mass the top-k rows miss much of the teacher's distribution
MASS_BINS = (0.0, 0.5, 0.8, 0.9, 0.95, 0.99, 1.0)  # histogram edges of the retained mass
MASS_SIGNALS = {"topk": "--top-k", "tpa": "--tpa-top-k", "iva": "--iva-top-k"}  # -> the extract option that sets k


def mass_distribution(mass: np.ndarray) -> dict[str, Any] | None:
    """mean, min, p5, p50, p95, max and a histogram over MASS_BINS of per-row retained masses."""
    if not mass.size:
        return None
    p5, p50, p95 = np.quantile(mass, [0.05, 0.5, 0.95])
    counts, _ = np.histogram(np.clip(mass, 0.0, 1.0), bins=MASS_BINS)
    return {"mean": float(mass.mean()), "min": float(mass.min()), "p5": float(p5), "p50": float(p50),
            "p95": float(p95), "max": float(mass.max()), "rows": int(mass.size),
            "histogram": {"edges": list(MASS_BINS), "counts": counts.tolist()}}


def retained_mass(reader: CacheReader, max_samples: int, seed: int = 0) -> dict[str, Any]:
    """Teacher probability mass kept by each top-k row (sum of its probabilities), over up to
    `max_samples` random samples: the mean per signal and its distribution, and a warning for
    each signal whose mean is below MASS_WARN."""
    n = min(len(reader), max_samples)
    rows: dict[str, list[np.ndarray]] = {sig: [] for sig in MASS_SIGNALS}
    idx = np.sort(np.random.default_rng(seed).choice(len(reader), size=n, replace=False)) if n else np.zeros(0, int)
    for start in range(0, n, 64):
        for s in reader.get_batch(idx[start:start + 64]):
            for sig, lps in (("topk", s.topk_logprobs), ("tpa", s.tpa_topk_logprobs), ("iva", s.iva_topk_logprobs)):
                rows[sig].append(np.exp(lps.astype(np.float64)).sum(-1).ravel())
    dist = {sig: mass_distribution(np.concatenate(v) if v else np.zeros(0)) for sig, v in rows.items()}
    warnings = [f"mean retained {sig} mass {d['mean']:.3f} < {MASS_WARN}: the cached rows miss "
                f"{1 - d['mean']:.0%} of the teacher's distribution on average (a larger {MASS_SIGNALS[sig]} at "
                f"extraction keeps more)" for sig, d in dist.items() if d is not None and d["mean"] < MASS_WARN]
    return {"mass_samples": n, "mean_topk_mass": dist["topk"] and dist["topk"]["mean"],
            "mean_tpa_topk_mass": dist["tpa"] and dist["tpa"]["mean"],
            "mean_iva_topk_mass": dist["iva"] and dist["iva"]["mean"], "retained_mass": dist, "warnings": warnings}


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
