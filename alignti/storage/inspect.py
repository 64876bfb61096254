"""`alignti inspect CACHE [--json]`: what a cache holds and what it costs."""

from __future__ import annotations

import json as jsonlib
import sys
from dataclasses import dataclass, field
from typing import Any

from alignti.storage.reader import CacheReader
from alignti.storage.stats import cache_stats


@dataclass(frozen=True)
class InspectConfig:
    cache: str = field(metadata={"help": "Cache directory or fsspec URL (file://, s3://, ...).", "argument": True})
    json: bool = field(default=False, metadata={"help": "Print one JSON object instead of a table."})
    verify: bool = field(default=False, metadata={"help": "Also check the sha256 of every file (reads it all)."})
    mass_samples: int = field(default=256, metadata={"help": "Samples read to estimate the retained top-k mass."})


def _fmt(v: float | None, unit: str = "") -> str:
    return "-" if v is None else f"{v:,.1f}{unit}"


def format_table(st: dict[str, Any]) -> str:
    """Human-readable report of `cache_stats` output."""
    lines = [
        f"cache                {st['cache']}",
        f"schema version       {st['schema_version']} (written by alignti {st['created_by']})",
        f"samples              {st['num_samples']:,} in {st['num_parts']} parts from workers {st['workers']}"
        + (f", {st['num_duplicates']} duplicate ids ignored" if st["num_duplicates"] else ""),
        f"response tokens      {st['num_response_tokens']:,}",
        f"TPA rows / IVA pos.  {st['num_tpa_rows']:,} / {st['num_iva_positions']:,}",
        f"rejects              {st['num_rejects']:,}"
        + "".join(f"\n  {reason:<21}{n:,}" for reason, n in st["rejects_by_reason"].items()),
        f"bytes total          {st['bytes_total']:,}",
        "bytes per response token (stored / as int32 ids + fp16 log-probs):",
    ]
    per, raw = st["bytes_per_response_token"], st["raw_bytes_per_response_token"]
    for sig, v in per.items():
        lines.append(f"  {sig:<19}{_fmt(v):>10}  {_fmt(raw.get(sig)) if sig in raw else '':>10}")
    lines += [f"retained top-k mass  (teacher probability kept per row, over {st['mass_samples']} samples)",
              "  signal" + " " * 12 + "".join(f"{q:>8}" for q in ("mean",) + QUANTILES) + "   rows per mass bin "
              + _bins(st)]
    for sig, d in st["retained_mass"].items():
        lines.append(f"  {sig:<18}{'-':>8}" if d is None else f"  {sig:<18}"
                     + "".join(f"{d[q]:>8.3f}" for q in ("mean",) + QUANTILES) + "   " + _histogram(d))
    lines += [
        f"settings             {', '.join(f'{k}={v}' for k, v in st['settings'].items() if k != 'irs_scores')}",
        f"IVA                  layer {st['iva']['layer']}, P <= {st['iva']['max_positions']}, "
        f"k_v = {st['iva']['top_k']}",
    ]
    scores = st["iva"]["irs_scores"]
    if scores:
        lines.append("IRS scores           " + " ".join(f"{i}:{s:.3f}" for i, s in enumerate(scores)))
    return "\n".join(lines)


QUANTILES = ("min", "p5", "p50", "p95", "max")
_BARS = " .:-=+*#@"  # ASCII: any terminal encoding


def _bins(st: dict[str, Any]) -> str:
    edges = next((d["histogram"]["edges"] for d in st["retained_mass"].values() if d), [])
    return " ".join(f"<{b:g}" if i < len(edges) - 2 else f"<={b:g}" for i, b in enumerate(edges[1:]))


def _histogram(d: dict[str, Any]) -> str:
    """One bar per mass bin, as high as its share of the largest bin, then the counts."""
    counts = d["histogram"]["counts"]
    top = max(max(counts), 1)
    bars = "".join(_BARS[0 if c == 0 else max(1, round(8 * c / top))] for c in counts)
    return f"|{bars}| {' '.join(f'{c:,}' for c in counts)}"


def run_inspect(cfg: InspectConfig) -> dict[str, Any]:
    """Open (validate), optionally verify, print the report; returns the stats dict."""
    reader = CacheReader.open(cfg.cache)
    if cfg.verify:
        reader.verify()
    st = cache_stats(reader, mass_samples=cfg.mass_samples)
    st["verified"] = bool(cfg.verify)
    print(jsonlib.dumps(st, sort_keys=False) if cfg.json else format_table(st))
    for warning in st["warnings"]:
        print(f"warning: {warning}", file=sys.stderr)
    return st
