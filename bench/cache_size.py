"""Cache size and read-rate benchmark on realistic synthetic teacher signals.

    python bench/cache_size.py                     # defaults: 512 samples, 60 response tokens, n_v=576
    python bench/cache_size.py --json              # one JSON object
    python bench/cache_size.py --samples 64 --no-encodings   # quick

Writes a cache with the real CacheWriter (ids Zipf(1) over a 151,936-token vocabulary, sorted
log-probs of a peaked softmax: alignti/storage/synthetic.py), then reports bytes per response
token per signal against plain int32 ids + fp16 log-probs, the random batched read rate, and
(unless --no-encodings) the alternative encodings of the top-k signal that were measured to
choose the format, with their size and quantisation error.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec

from alignti.storage.arrays import BLOSC_LEVEL, chunking
from alignti.storage.encoding import decode_logprobs_abs, decode_logprobs_delta
from alignti.storage.reader import CacheReader
from alignti.storage.schema import FINGERPRINT_KEYS, CacheManifest, CacheSettings
from alignti.storage.stats import cache_stats
from alignti.storage.synthetic import QWEN_VOCAB, synthetic_sample
from alignti.storage.writer import CacheWriter


def compressed_nbytes(data: np.ndarray, shuffle: str = "shuffle", clevel: int = BLOSC_LEVEL) -> int:
    """Bytes of `data` stored as the cache stores arrays (sharded, Blosc-zstd, CRC32C), excl. metadata."""
    with tempfile.TemporaryDirectory() as d:
        chunks, shards = chunking(data.shape, data.dtype.itemsize)
        arr = zarr.create_array(d, shape=data.shape, dtype=data.dtype, chunks=chunks, shards=shards, fill_value=0,
                                compressors=[BloscCodec(cname="zstd", clevel=clevel, shuffle=shuffle), Crc32cCodec()])
        arr[...] = data
        return sum(p.stat().st_size for p in Path(d).rglob("*") if p.is_file() and p.name != "zarr.json")


def _codes(lp: np.ndarray, step: float) -> np.ndarray:
    return np.maximum(np.ceil(-lp.astype(np.float64) / step), 0).astype(np.int64)


def lp_errors(lp: np.ndarray, lp_hat: np.ndarray) -> dict[str, float]:
    """Max |log-prob error|, max relative prob error, max L1 error of the (k+1)-bucket distribution."""
    p, q = np.exp(lp.astype(np.float64)), np.exp(lp_hat.astype(np.float64))
    r, r_hat = np.clip(1 - p.sum(-1), 0, 1), 1 - q.sum(-1)  # r_hat unclamped: can it go negative?
    return {"max_abs_logprob_err": float(np.abs(lp - lp_hat.astype(np.float64)).max()),
            "max_rel_prob_err": float((np.abs(q - p) / p).max()),
            "max_l1_bucket_err": float((np.abs(q - p).sum(-1) + np.abs(r_hat - r)).max()),
            "min_tail_mass": float(r_hat.min())}


def encoding_table(ids: np.ndarray, lp: np.ndarray) -> list[dict]:
    """Alternative encodings of the [R, k] top-k ids and log-probs (B per response token)."""
    rows = ids.shape[0]
    out = []
    for name, shuffle, level in [("int32, byte shuffle (chosen)", "shuffle", BLOSC_LEVEL),
                                 ("int32, bit shuffle", "bitshuffle", BLOSC_LEVEL),
                                 ("int32, no shuffle", "noshuffle", BLOSC_LEVEL),
                                 ("int32, byte shuffle, clevel 9", "shuffle", 9)]:
        out.append({"part": "ids", "encoding": name, "bytes_per_token": compressed_nbytes(ids, shuffle, level) / rows})
    order = np.argsort(ids, axis=1, kind="stable")
    sorted_ids = np.take_along_axis(ids, order, 1)
    delta = np.diff(sorted_ids, axis=1, prepend=0).astype(np.uint32)
    perm = np.argsort(order, axis=1).astype(np.uint8)
    out.append({"part": "ids", "encoding": "ascending + delta uint32, + rank permutation uint8",
                "bytes_per_token": (compressed_nbytes(delta) + compressed_nbytes(perm)) / rows})
    variants = [("float32", lp.astype(np.float32), lp.astype(np.float32)),
                ("float16", lp.astype(np.float16), lp.astype(np.float16).astype(np.float32)),
                ("bfloat16 (truncated float32)", (lp.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16),
                 ((lp.astype(np.float32).view(np.uint32) >> 16) << 16).view(np.float32))]
    for e in (8, 10, 12):
        n = _codes(lp, 2.0**-e)
        d = np.minimum(np.diff(n, axis=1, prepend=0), 65535).astype(np.uint16)
        tag = " (chosen)" if e == 10 else ""
        variants.append((f"uint16 delta codes, step 2^-{e}{tag}", d, decode_logprobs_delta(d, 2.0**-e)))
    a = np.minimum(_codes(lp, 2.0**-10), 65535).astype(np.uint16)
    variants.append(("uint16 absolute codes, step 2^-10", a, decode_logprobs_abs(a, 2.0**-10)))
    n8 = _codes(lp, 2.0**-4)
    d8 = np.minimum(np.diff(n8, axis=1, prepend=0), 255).astype(np.uint8)
    variants.append(("uint8 delta codes, step 2^-4", d8, decode_logprobs_delta(d8, 2.0**-4)))
    for name, stored, decoded in variants:
        out.append({"part": "logprobs", "encoding": name, "bytes_per_token": compressed_nbytes(stored) / rows,
                    **lp_errors(lp, decoded)})
    return out


def write_cache(root: Path, args: argparse.Namespace) -> tuple[float, np.ndarray, np.ndarray]:
    """Write the synthetic cache; returns (write seconds, top-k ids, top-k log-probs of all samples)."""
    settings = CacheSettings()
    fp: dict[str, str | int] = {k: f"bench-{k}" for k in FINGERPRINT_KEYS}
    fp.update(vocab_size=QWEN_VOCAB, num_hidden_layers=28)
    rng = np.random.default_rng(args.seed)
    samples = [synthetic_sample(rng, settings, n_resp=args.resp, n_v=args.n_v, vocab=args.vocab)
               for _ in range(args.samples)]
    t0 = time.perf_counter()
    with CacheWriter.open(root, CacheManifest.create(fp, settings), worker=0, num_workers=1,
                          part_size=args.part_size) as w:
        for s in samples:
            w.add(s)
    seconds = time.perf_counter() - t0
    return seconds, np.concatenate([s.topk_ids for s in samples]), np.concatenate([s.topk_logprobs for s in samples])


def read_rate(url: str, batch_size: int, seconds: float) -> dict[str, float]:
    """Random shuffled batches for ~`seconds` from a freshly opened reader (cold part handles)."""
    reader = CacheReader.open(url)
    n = tokens = 0
    t0 = time.perf_counter()
    epoch = 0
    while time.perf_counter() - t0 < seconds:
        for batch in reader.iter_batches(batch_size, shuffle=True, seed=epoch):
            n += len(batch)
            tokens += sum(s.num_response_tokens for s in batch)
        epoch += 1
    dt = time.perf_counter() - t0
    return {"batch_size": batch_size, "samples_per_s": n / dt, "response_tokens_per_s": tokens / dt}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--samples", type=int, default=512)
    ap.add_argument("--resp", type=int, default=60, help="response tokens per sample")
    ap.add_argument("--n-v", type=int, default=576, help="vision tokens per sample")
    ap.add_argument("--vocab", type=int, default=QWEN_VOCAB)
    ap.add_argument("--part-size", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--read-seconds", type=float, default=3.0)
    ap.add_argument("--out", default=None, help="cache directory to write (default: a temp dir, removed)")
    ap.add_argument("--no-encodings", action="store_true", help="skip the alternative-encodings table")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="alignti-bench-"))
    try:
        if args.out and root.exists():
            shutil.rmtree(root)
        write_s, ids, lp = write_cache(root, args)
        st = cache_stats(CacheReader.open(str(root)), mass_samples=args.samples)
        result = {"config": vars(args), "write_samples_per_s": args.samples / write_s,
                  "bytes_per_response_token": st["bytes_per_response_token"],
                  "raw_bytes_per_response_token": st["raw_bytes_per_response_token"],
                  "mean_topk_mass": st["mean_topk_mass"], "num_parts": st["num_parts"],
                  "read": [read_rate(str(root), bs, args.read_seconds / 2) for bs in (8, 32)]}
        if not args.no_encodings:
            result["topk_encodings"] = encoding_table(ids, lp)
    finally:
        if not args.out:
            shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(result) if args.json else report(result))
    return result


def report(r: dict) -> str:
    per, raw = r["bytes_per_response_token"], r["raw_bytes_per_response_token"]
    c = r["config"]
    lines = [f"{c['samples']} samples x {c['resp']} response tokens, n_v={c['n_v']}, V={c['vocab']}, "
             f"{r['num_parts']} parts; mean top-64 mass {r['mean_topk_mass']:.3f}",
             f"{'signal':<14}{'B/token':>10}{'raw int32+fp16':>16}"]
    for k, v in per.items():
        lines.append(f"{k:<14}{v:>10.1f}{raw[k]:>16.1f}" if k in raw else f"{k:<14}{v:>10.1f}")
    lines.append(f"write {r['write_samples_per_s']:.0f} samples/s")
    for rd in r["read"]:
        lines.append(f"random reads, batch {rd['batch_size']}: {rd['samples_per_s']:.0f} samples/s "
                     f"({rd['response_tokens_per_s']:.0f} response tokens/s)")
    for e in r.get("topk_encodings", []):
        err = ""
        if "max_rel_prob_err" in e:
            err = (f"  max|dlp| {e['max_abs_logprob_err']:.2e}  max rel dp {e['max_rel_prob_err']:.2e}  "
                   f"max L1 {e['max_l1_bucket_err']:.2e}  min r {e['min_tail_mass']:.1e}")
        lines.append(f"top-k {e['part']:<9}{e['bytes_per_token']:>7.1f} B  {e['encoding']}{err}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main()
