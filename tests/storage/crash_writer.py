"""Subprocess writer for the crash and concurrency tests.

    python -m tests.storage.crash_writer ROOT --worker 0 --num-workers 1 --samples 60 --part-size 5
        [--resume] [--slow S] [--hold S]

Writes the deterministic samples of tests.storage.helpers.make_samples (row i goes to worker
i % num_workers; every 7th row is a reject), skipping what is committed. Prints READY once the
writer is open; with --hold it announces WRITING (zarr written, parquet not yet) and COMMITTING
(part complete, not yet renamed) and sleeps there, so a test can SIGKILL inside a commit.
"""

from __future__ import annotations

import argparse
import time

import alignti.storage.writer as writer_mod
from tests.storage.helpers import make_samples, manifest


def reject_id(i: int) -> str | None:
    return f"bad-{i}" if i % 7 == 5 else None


def _instrument(hold: float) -> None:
    write_parquet, publish_part = writer_mod.write_parquet, writer_mod.publish_part

    def slow_parquet(table, path):  # noqa: ANN001, ANN202 - test shim
        if path.name == "samples.parquet":
            print("WRITING", flush=True)
            time.sleep(hold)
        write_parquet(table, path)

    def slow_publish(tmp, final, info):  # noqa: ANN001, ANN202
        print("COMMITTING", flush=True)
        time.sleep(hold)
        publish_part(tmp, final, info)

    writer_mod.write_parquet, writer_mod.publish_part = slow_parquet, slow_publish


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("root")
    ap.add_argument("--worker", type=int, default=0)
    ap.add_argument("--num-workers", type=int, default=1)
    ap.add_argument("--samples", type=int, default=60)
    ap.add_argument("--part-size", type=int, default=5)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--slow", type=float, default=0.0)
    ap.add_argument("--hold", type=float, default=0.0)
    a = ap.parse_args()
    if a.hold:
        _instrument(a.hold)
    samples = make_samples(a.samples, seed=11)
    w = writer_mod.CacheWriter.open(a.root, manifest(), worker=a.worker, num_workers=a.num_workers, resume=a.resume,
                                    part_size=a.part_size)
    print("READY", flush=True)
    done, rejected = w.committed_ids(), w.rejected_source_ids()
    for i, s in enumerate(samples):
        if i % a.num_workers != a.worker:
            continue
        bad = reject_id(i)
        if bad is not None:
            if bad not in rejected:
                w.add_reject(bad, "missing_image", f"row {i}")
        elif s.sample_id not in done:
            w.add(s)
            time.sleep(a.slow)
    w.close()
    print("DONE", flush=True)


if __name__ == "__main__":
    main()
