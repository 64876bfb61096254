"""CacheWriter: one worker's crash-safe, append-only writer of committed parts.

Usage (extract):

    with CacheWriter.open(out, manifest, resume=True) as w:      # worker from RANK/WORLD_SIZE
        done, rejected = w.committed_ids(), w.rejected_source_ids()
        for row in my_rows:                                       # skip done / rejected rows
            w.add(signals)  or  w.add_reject(row_id, "missing_image", "img/3.jpg not found")

Samples are buffered in memory and committed every `part_size` samples (and at close) as one
part: a crash loses at most the uncommitted buffer. Rejects ride in the same part
(rejects.parquet), so they are committed exactly when the samples around them are. A committed
reject is final for this cache: on resume `rejected_source_ids()` returns it so extract does not
retry it (rejects are deterministic: missing image, too long...). `retry_rejects=True` returns
an empty set instead, so extract retries them; a later success supersedes the reject in the
reader, a repeated failure is recorded again and the reader keeps the latest reason.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from alignti.errors import AlignTIError
from alignti.storage.arrays import write_signals
from alignti.storage.catalog import CacheLocation, check_part_sizes, list_parts, read_rejects, read_samples_columns
from alignti.storage.lifecycle import check_root_is_ours, local_root, prepare_root
from alignti.storage.packing import pack
from alignti.storage.parts import PartInfo, WorkerLock, clean_stale_temps, part_name, publish_part, seal_dir
from alignti.storage.schema import (
    ARRAYS, GROUPS, PARTS_DIR, REJECT_COLUMNS, REJECTS_PARQUET, SAMPLES_PARQUET, CacheManifest, CacheSettings,
    SampleSignals, check_fingerprint,
)
from alignti.storage.validation import validate_sample

PARQUET_ROW_GROUP = 64  # rows per row group: the reader reads only the groups a batch touches
_REASON_RE = re.compile(r"^[a-z0-9_]+$")


def resolve_worker(worker: int | None, num_workers: int | None) -> tuple[int, int]:
    """Explicit (worker, num_workers), else RANK/WORLD_SIZE (torchrun, accelerate), else (0, 1)."""
    if (worker is None) != (num_workers is None):
        raise ValueError("give both worker and num_workers, or neither (then RANK/WORLD_SIZE are used)")
    if worker is None:
        try:
            worker, num_workers = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
        except ValueError:
            raise AlignTIError("RANK / WORLD_SIZE must be integers") from None
    assert num_workers is not None
    if not 0 <= worker < num_workers:
        raise AlignTIError(f"worker index {worker} is not in [0, {num_workers})")
    return worker, num_workers


def write_parquet(table: pa.Table, path: Path) -> None:
    pq.write_table(table, path, compression="zstd", row_group_size=PARQUET_ROW_GROUP, write_page_checksum=True)


def write_part_files(part_dir: Path, samples: list[SampleSignals], rejects: list[tuple[str, str, str]],
                     settings: CacheSettings) -> dict[str, int]:
    """Every file of a part but part.json into `part_dir`: the signal arrays, samples.parquet and
    rejects.parquet ((source_id, reason, detail) rows). Returns the rows per ragged group."""
    arrays, table = pack(samples, settings)
    write_signals(part_dir, arrays)
    write_parquet(table, part_dir / SAMPLES_PARQUET)
    columns = {c: [r[i] for r in rejects] for i, (c, _, _) in enumerate(REJECT_COLUMNS)}
    write_parquet(pa.table({c: pa.array(v, pa.string()) for c, v in columns.items()}), part_dir / REJECTS_PARQUET)
    return {g: int(arrays[next(a.name for a in ARRAYS if a.group == g)].shape[0]) for g in GROUPS}


class CacheWriter:
    """Appends parts `parts/w<worker>-<n>/` to a cache. Create with `CacheWriter.open`."""

    def __init__(self, root: Path, manifest: CacheManifest, worker: int, num_workers: int, part_size: int,
                 lock: WorkerLock, retry_rejects: bool, scan: bool = True) -> None:
        self.root, self.manifest, self.worker, self.num_workers = root, manifest, worker, num_workers
        self.part_size, self.retry_rejects = part_size, retry_rejects
        self._lock: WorkerLock | None = lock
        self._hash = manifest.identity_hash()
        fp_vocab = manifest.teacher_fingerprint.get("vocab_size")
        self._vocab_size = fp_vocab if isinstance(fp_vocab, int) else None
        self._samples: list[SampleSignals] = []
        self._rejects: list[tuple[str, str, str]] = []
        self._buffered_ids: set[str] = set()
        self._buffered_rejects: set[str] = set()
        self.num_added = self.num_duplicates = self.num_rejects = self.num_parts = 0
        self._committed: set[str] = set()
        self._committed_sources: set[str] = set()
        self._rejected: set[str] = set()
        self._next_n = 0
        if scan:
            self._scan_existing()

    @classmethod
    def open(cls, path: str | os.PathLike, manifest: CacheManifest, *, worker: int | None = None,
             num_workers: int | None = None, resume: bool = False, overwrite: bool = False, part_size: int = 256,
             retry_rejects: bool = False) -> CacheWriter:
        """Open (create, resume or overwrite) the cache at local `path` for one worker.

        AlignTIError (nothing touched) if the cache exists without resume/overwrite, if resume finds
        other teacher/settings, or if another live process holds this worker index; ValueError for
        arguments the caller should have checked (part_size, resume with overwrite, an incomplete
        teacher fingerprint).
        """
        if part_size < 1:
            raise ValueError(f"part_size must be >= 1, got {part_size}")
        if resume and overwrite:
            raise ValueError("resume and overwrite are mutually exclusive")
        check_fingerprint(manifest.teacher_fingerprint)
        worker, num_workers = resolve_worker(worker, num_workers)
        root = local_root(path)
        if overwrite:  # take the worker lock before deleting anything of ours
            check_root_is_ours(root)
            (root / PARTS_DIR).mkdir(parents=True, exist_ok=True)
            lock = WorkerLock(root / PARTS_DIR, worker)
            try:
                prepare_root(root, manifest, worker=worker, num_workers=num_workers, resume=False, overwrite=True)
            except BaseException:
                lock.release()
                raise
        else:
            prepare_root(root, manifest, worker=worker, num_workers=num_workers, resume=resume, overwrite=False)
            (root / PARTS_DIR).mkdir(exist_ok=True)
            lock = WorkerLock(root / PARTS_DIR, worker)
        clean_stale_temps(root / PARTS_DIR, worker)
        try:
            # After an overwrite nothing of ours is left, and sibling workers may still be deleting
            # their old parts: scanning them would race, and there is nothing to skip anyway.
            return cls(root, manifest, worker, num_workers, part_size, lock, retry_rejects, scan=not overwrite)
        except BaseException:
            lock.release()
            raise

    def _scan_existing(self) -> None:
        loc = CacheLocation.of(str(self.root))
        parts = list_parts(loc, self._hash)
        check_part_sizes(loc, parts)
        for p in parts:
            cols = read_samples_columns(loc, p, ["sample_id", "source_id"])
            self._committed.update(cols["sample_id"])
            self._committed_sources.update(cols["source_id"])
            if p.num_rejects:
                self._rejected.update(read_rejects(loc, p)["source_id"])
            if p.worker == self.worker:
                self._next_n = max(self._next_n, int(p.name.split("-")[1]) + 1)

    def committed_ids(self) -> set[str]:
        """Sample ids in committed parts of all workers (as of open, plus this writer's commits)."""
        return set(self._committed)

    def rejected_source_ids(self) -> set[str]:
        """Source ids rejected in committed parts (empty with retry_rejects): extract skips these."""
        return set() if self.retry_rejects else self._rejected - self._committed_sources

    def add(self, sample: SampleSignals) -> bool:
        """Buffer one sample (validated); False if its sample_id is already committed or buffered."""
        self._check_open()
        s = validate_sample(sample, self.manifest.settings, self._vocab_size)
        if s.sample_id in self._committed or s.sample_id in self._buffered_ids:
            self.num_duplicates += 1
            return False
        self._samples.append(s)
        self._buffered_ids.add(s.sample_id)
        self.num_added += 1
        if len(self._samples) >= self.part_size:
            self.commit()
        return True

    def add_reject(self, source_id: str, reason: str, detail: str = "") -> bool:
        """Record a skipped corpus row; False if already recorded (committed or buffered)."""
        self._check_open()
        if not isinstance(source_id, str) or not isinstance(detail, str):
            raise ValueError("source_id and detail must be str")
        if not isinstance(reason, str) or not _REASON_RE.match(reason):
            raise ValueError(f"reject reason must be a snake_case identifier, got {reason!r}")
        if source_id in self._buffered_rejects or (not self.retry_rejects and source_id in self._rejected):
            return False
        self._rejects.append((source_id, reason, detail))
        self._buffered_rejects.add(source_id)
        self.num_rejects += 1
        if len(self._rejects) >= 4 * self.part_size:
            self.commit()
        return True

    def commit(self) -> str | None:
        """Write the buffer as one part (temp dir, fsync, rename); returns its name, None if empty."""
        self._check_open()
        if not self._samples and not self._rejects:
            return None
        name = part_name(self.worker, self._next_n)
        parts_dir = self.root / PARTS_DIR
        tmp = parts_dir / f".tmp-{name}-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        rows = write_part_files(tmp, self._samples, self._rejects, self.manifest.settings)
        info = PartInfo(name, self.worker, len(self._samples), len(self._rejects), self._hash, time.time(), rows,
                        seal_dir(tmp))
        publish_part(tmp, parts_dir / name, info)
        self._committed.update(self._buffered_ids)
        self._committed_sources.update(s.source_id for s in self._samples)
        self._rejected.update(self._buffered_rejects)
        self._samples, self._rejects = [], []
        self._buffered_ids, self._buffered_rejects = set(), set()
        self._next_n += 1
        self.num_parts += 1
        return name

    def close(self) -> None:
        """Commit what is buffered and release the worker lock (idempotent)."""
        if self._lock is None:
            return
        try:
            self.commit()
        finally:
            self._lock.release()
            self._lock = None

    def _check_open(self) -> None:
        if self._lock is None:
            raise ValueError("this CacheWriter is closed")

    def __enter__(self) -> CacheWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        # Buffered samples are complete and validated, so they are committed even on an exception.
        self.close()

