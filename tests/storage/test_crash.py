"""Crash safety (SIGKILL at random points, then resume) and two concurrent worker processes."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq

from alignti.storage.reader import CacheReader
from alignti.storage.schema import ARRAYS
from tests.storage.crash_writer import reject_id
from tests.storage.helpers import assert_same_signals, make_samples

REPO = Path(__file__).resolve().parents[2]
N, PART = 60, 5
EXPECTED = {s.sample_id: s for i, s in enumerate(make_samples(N, seed=11)) if reject_id(i) is None}


def spawn(root: Path, *args: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.Popen([sys.executable, "-m", "tests.storage.crash_writer", str(root), "--samples", str(N),
                             "--part-size", str(PART), *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def run_to_end(root: Path, *args: str) -> None:
    p = spawn(root, *args)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0 and "DONE" in out, err


def wait_for(p: subprocess.Popen, word: str) -> bool:
    for line in p.stdout:  # type: ignore[union-attr]
        if line.strip() == word:
            return True
    return False


def check_consistent(root: Path) -> CacheReader:
    """The reader opens, sees only complete parts, and every sample it sees is exactly right."""
    r = CacheReader.open(str(root))
    for p in r.parts:
        assert p.num_samples + p.num_rejects > 0 and p.num_samples <= PART
    assert r.num_duplicates == 0 and set(r.sample_ids) <= set(EXPECTED)
    for s in r.get_batch(range(len(r))):
        assert_same_signals(EXPECTED[s.sample_id], s)
    return r


def signal_bytes(r: CacheReader) -> list[bytes]:
    out = []
    for s in r.get_batch(range(len(r))):  # index order = sample-id order
        out.append(s.sample_id.encode() + s.text_ids.tobytes() + s.label_spans.tobytes())
        out.extend(getattr(s, a.name).tobytes() for a in ARRAYS)
    return out


def test_sigkill_at_random_points_then_resume_equals_uninterrupted(tmp_path):
    ref_root, root = tmp_path / "ref", tmp_path / "crashy"
    run_to_end(ref_root)
    rng = random.Random(20240611)
    seen_counts, saw_temp = [], False
    for attempt, trigger in enumerate(["COMMITTING", "WRITING", None, None, None, None]):
        p = spawn(root, "--resume", "--slow", "0.003", "--hold", "0.05")
        assert wait_for(p, "READY")
        if trigger is not None:  # deterministic kills inside a commit: after the zarr write / before rename
            assert wait_for(p, trigger)
        else:
            time.sleep(rng.uniform(0.0, 0.3))
        p.send_signal(signal.SIGKILL)
        p.communicate()
        temps = [d for d in (root / "parts").iterdir() if d.name.startswith(".tmp-")]
        saw_temp |= bool(temps)
        seen_counts.append(len(check_consistent(root)))
    assert saw_temp, "no kill landed inside a commit"
    assert seen_counts == sorted(seen_counts)  # progress is never lost
    run_to_end(root, "--resume")
    final, ref = check_consistent(root), CacheReader.open(str(ref_root))
    assert final.sample_ids == ref.sample_ids == sorted(EXPECTED)
    assert signal_bytes(final) == signal_bytes(ref)
    rejects = [(x["source_id"], x["reason"]) for x in final.rejects()]
    assert rejects == [(x["source_id"], x["reason"]) for x in ref.rejects()]
    assert sorted(x for x, _ in rejects) == sorted(f"bad-{i}" for i in range(N) if reject_id(i))
    assert not [d for d in (root / "parts").iterdir() if d.name.startswith(".tmp-")]  # resume cleaned up


def test_two_concurrent_workers(tmp_path):
    root = tmp_path / "c"
    procs = [spawn(root, "--worker", str(w), "--num-workers", "2", "--slow", "0.002") for w in (0, 1)]
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0 and "DONE" in out, err
    r = check_consistent(root)
    assert r.sample_ids == sorted(EXPECTED) and r.num_duplicates == 0  # complete, no duplicates, no loss
    assert {p.worker for p in r.parts} == {0, 1}
    row_of = {s.sample_id: i for i, s in enumerate(make_samples(N, seed=11))}
    for p in r.parts:  # each part holds only its own worker's rows (read with pyarrow alone)
        ids = pq.read_table(root / "parts" / p.name / "samples.parquet", columns=["sample_id"]).column(0).to_pylist()
        assert all(row_of[i] % 2 == p.worker for i in ids)
    assert len(r.rejects()) == sum(1 for i in range(N) if reject_id(i))
