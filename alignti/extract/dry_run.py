"""`alignti extract --dry-run`: plan an extraction, write nothing.

Reads the corpus (or its first --limit rows) and encodes every row as the real run does, so the
samples and rejects by reason are the real run's; loads the teacher (and runs IRS for
`--iva-layer auto`) as the real run does; runs a few length-grouped batches of randomly chosen
samples through the teacher, timing them; and stores their signals exactly as a cache part does
(`storage.writer.write_part_files`: the storage encoding, Zarr shards with Blosc, Parquet) in a
temporary directory outside --out: once all of them, once the first half. The two parts give each
signal's bytes per part (metadata, Parquet column chunks, the first rows) and per unit, and the
estimate is

    parts x (bytes per part) + (bytes per unit) x units in the corpus

with the unit the quantity that drives the signal's rows and that encoding alone gives for every
sample: response tokens (top-k, TPA), vision tokens (IVA saliency), samples with an image (IVA
top-k_v rows), text tokens (samples.parquet), rejects (a random sample of the real ones). Wall time for the whole corpus at n workers (from
--worker i/n, else RANK/WORLD_SIZE): load + IRS + (encode + teacher + writes) / n, the teacher time
scaled from the timed batches by tokens, the writes by bytes.
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from alignti.data.batching import collate, length_grouped
from alignti.data.corpus import Reject
from alignti.extract.run import ExtractConfig, load_teacher, parse_worker, signal_backend, worker_rows
from alignti.storage.parts import PartInfo, part_name, publish_part, seal_dir
from alignti.storage.schema import SampleSignals
from alignti.storage.stats import SIGNALS, signal_of
from alignti.storage.writer import resolve_worker, write_part_files

UNITS = {"topk": "response_tokens", "tpa": "response_tokens", "iva_saliency": "vision_tokens",
         "iva_topk": "image_samples", "metadata": "text_tokens", "rejects": "rejects"}


MAX_REJECT_ROWS = 256  # rejects written into the measured parts


class Reservoir(list):
    """A uniform random sample of at most `size` of the items offered (seeded)."""

    def __init__(self, size: int, seed: int) -> None:
        super().__init__()
        self.size, self.seen, self.rng = size, 0, random.Random(seed)

    def offer(self, item: Any) -> None:
        self.seen += 1
        if len(self) < self.size:
            self.append(item)
        elif (j := self.rng.randrange(self.seen)) < self.size:
            self[j] = item


def corpus_counts(cfg: ExtractConfig, encoder: Any, keep: int) -> tuple[Counter, Counter, list, list, float]:
    """Encode every row: (unit counts, rejects by reason, `keep` samples and up to MAX_REJECT_ROWS
    reject rows drawn at random, encode seconds)."""
    units, reasons = Counter(), Counter()
    kept, rejects = Reservoir(keep, cfg.seed), Reservoir(MAX_REJECT_ROWS, cfg.seed)
    start = time.time()
    for row in worker_rows(cfg.data, 0, 1, cfg.limit):
        enc = row if isinstance(row, Reject) else encoder.encode(row)
        if isinstance(enc, Reject):
            reasons[enc.reason] += 1
            rejects.offer((enc.source_id, enc.reason, enc.detail))
            continue
        units.update(samples=1, tokens=enc.length, response_tokens=int(enc.resp_positions.numel()),
                     vision_tokens=enc.n_v, image_samples=int(enc.n_v > 0), text_tokens=len(enc.text_ids))
        kept.offer(enc)
    units["rejects"] = sum(reasons.values())
    return units, reasons, list(kept), list(rejects), time.time() - start


def signal_units(signals: list[SampleSignals], rejects: int) -> Counter:
    """The units (see UNITS) of these samples and reject rows."""
    return Counter(response_tokens=sum(s.num_response_tokens for s in signals), vision_tokens=sum(s.n_v for s in signals),
                   image_samples=sum(int(s.n_v > 0) for s in signals),
                   text_tokens=sum(len(s.text_ids) for s in signals), rejects=rejects)


def part_bytes(samples: list[SampleSignals], rejects: list[tuple[str, str, str]], settings: Any,
               manifest_hash: str) -> tuple[dict[str, int], float]:
    """({signal: bytes} of one part holding these samples and rejects, seconds to write it), written
    as the cache writer writes a part, into a temporary directory that is removed again."""
    with tempfile.TemporaryDirectory(prefix="alignti-dry-run-") as tmp:
        start = time.time()
        name, building = part_name(0, 0), Path(tmp) / "building"
        building.mkdir()
        rows = write_part_files(building, samples, rejects, settings)
        info = PartInfo(name, 0, len(samples), len(rejects), manifest_hash, time.time(), rows, seal_dir(building))
        publish_part(building, Path(tmp) / name, info)
        seconds = time.time() - start
        out = Counter({s: 0 for s in SIGNALS})
        for path in (Path(tmp) / name).rglob("*"):
            if path.is_file():
                out[signal_of(path.relative_to(Path(tmp) / name).as_posix())] += path.stat().st_size
    return dict(out), seconds


def fit_part_bytes(signals: list[SampleSignals], rejects: list[tuple[str, str, str]], settings: Any,
                   manifest_hash: str) -> tuple[dict[str, float], dict[str, float], int, float]:
    """Each signal's (bytes per part, bytes per unit) from a part of all `signals` and `rejects`
    and one of their first halves; also the full part's bytes and write seconds."""
    half, rhalf = len(signals) // 2, len(rejects) // 2
    small, _ = part_bytes(signals[:half], rejects[:rhalf], settings, manifest_hash)
    full, seconds = part_bytes(signals, rejects, settings, manifest_hash)
    u_small, u_full = signal_units(signals[:half], rhalf), signal_units(signals, len(rejects))
    fixed, rate = {}, {}
    for sig in SIGNALS:
        du = u_full[UNITS[sig]] - u_small[UNITS[sig]]
        rate[sig] = max(full[sig] - small[sig], 0) / du if du > 0 else 0.0
        fixed[sig] = max(small[sig] - rate[sig] * u_small[UNITS[sig]], 0.0)
    return fixed, rate, sum(full.values()), seconds


def num_parts(samples: int, workers: int, part_size: int) -> int:
    """Committed parts of the whole cache: each worker commits every `part_size` of its samples."""
    share = [samples // workers + (w < samples % workers) for w in range(workers)]
    return sum(max(1, math.ceil(n / part_size)) for n in share)


def estimate_bytes(units: Counter, fixed: dict[str, float], rate: dict[str, float], parts: int) -> dict[str, int]:
    """{signal: estimated bytes over the whole cache} (see the module docstring)."""
    return {sig: round(parts * fixed[sig] + rate[sig] * units[UNITS[sig]]) for sig in SIGNALS}


def dry_run(cfg: ExtractConfig) -> dict[str, Any]:
    """Plan the extraction: print the table (stderr), return the estimate."""
    _, workers = resolve_worker(*parse_worker(cfg.worker))
    start = time.time()
    t = load_teacher(cfg)
    teacher = signal_backend(cfg, t)
    setup_seconds = time.time() - start
    units, reasons, kept, reject_rows, encode_seconds = corpus_counts(cfg, t.encoder,
                                                                      (cfg.dry_run_batches + 1) * cfg.batch_size)
    batches = list(length_grouped(kept, cfg.batch_size))
    signals, timed_tokens, teacher_seconds = [], 0, 0.0
    for i, group in enumerate(batches):
        t0 = time.time()
        signals += teacher(collate(group, t.pad_id))
        if i > 0 or len(batches) == 1:  # the first batch warms up (allocations, kernels) unless it is the only one
            teacher_seconds += time.time() - t0
            timed_tokens += sum(s.length for s in group)
    fixed, rate, timed_bytes, write_seconds = fit_part_bytes(signals, reject_rows, t.settings,
                                                             t.manifest.identity_hash())
    parts = num_parts(units["samples"], workers, cfg.part_size)
    by_signal = estimate_bytes(units, fixed, rate, parts)
    total = len(json.dumps(t.manifest.to_dict(), indent=1, sort_keys=True)) + sum(by_signal.values())  # + cache.json
    per_token = units["tokens"] / max(timed_tokens, 1)
    seconds = {"load_and_irs": setup_seconds, "encode": encode_seconds,
               "teacher": teacher_seconds * per_token, "writes": write_seconds * total / max(timed_bytes, 1)}
    wall = seconds["load_and_irs"] + (seconds["encode"] + seconds["teacher"] + seconds["writes"]) / workers
    result = {
        "dry_run": True, "out": cfg.out, "out_exists": os.path.exists(cfg.out), "rows": units["samples"] +
        units["rejects"], "samples": units["samples"], "rejects": dict(reasons.most_common()),
        "tokens": units["tokens"], "response_tokens": units["response_tokens"], "iva_layer": t.settings.iva_layer,
        "timed_batches": max(len(batches) - 1, 1) if batches else 0, "timed_tokens": timed_tokens,
        "teacher_tokens_per_second": round(timed_tokens / max(teacher_seconds, 1e-9), 1),
        "cache_bytes": total, "cache_bytes_by_signal": by_signal, "parts": parts,
        "bytes_per_response_token": round(total / max(units["response_tokens"], 1), 1),
        "workers": workers, "seconds": {k: round(v, 3) for k, v in seconds.items()}, "wall_seconds": round(wall, 1),
    }
    print(format_plan(cfg, result), file=sys.stderr)
    return result


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1000
    raise AssertionError


def _duration(s: float) -> str:
    return f"{s:.1f} s" if s < 90 else f"{s / 60:.1f} min" if s < 5400 else f"{s / 3600:.1f} h"


def format_plan(cfg: ExtractConfig, r: dict[str, Any]) -> str:
    """The dry run's table."""
    tok = max(r["response_tokens"], 1)
    lines = [f"extract --dry-run: {cfg.data}" + (f" (first {cfg.limit} rows)" if cfg.limit else ""),
             f"rows                 {r['rows']:,}",
             f"samples              {r['samples']:,} ({r['tokens']:,} tokens, {r['response_tokens']:,} response "
             f"tokens)",
             f"rejects              {sum(r['rejects'].values()):,}"]
    lines += [f"  {reason:<21} {n:,}" for reason, n in r["rejects"].items()]
    lines += [f"IVA layer            {r['iva_layer']}",
              f"teacher              {r['timed_batches']} timed batch(es) of <= {cfg.batch_size}: "
              f"{r['teacher_tokens_per_second']:,.0f} tokens/s",
              f"cache estimate       {_size(r['cache_bytes'])} in {r['parts']} part(s), "
              f"{r['bytes_per_response_token']:,.1f} B per response token",
              "  signal                  bytes   B/resp. token"]
    lines += [f"  {sig:<15}{_size(b):>14}{b / tok:>16,.1f}" for sig, b in r["cache_bytes_by_signal"].items()]
    s = r["seconds"]
    lines += [f"wall time estimate   {_duration(r['wall_seconds'])} with {r['workers']} worker(s): load + IRS "
              f"{_duration(s['load_and_irs'])}, then per worker encode {_duration(s['encode'] / r['workers'])}, "
              f"teacher {_duration(s['teacher'] / r['workers'])}, writes {_duration(s['writes'] / r['workers'])}",
              f"nothing written      {cfg.out} " + ("exists: the real run needs --resume or --overwrite"
                                                    if r["out_exists"] else "does not exist yet")]
    return "\n".join(lines)
