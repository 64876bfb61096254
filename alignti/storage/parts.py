"""Committed parts on disk: naming, part.json, sealing (fsync + checksums), per-worker locks.

A part `parts/w<worker>-<n>/` is written under `parts/.tmp-w<worker>-<n>-<pid>/`, every file is
fsynced, `part.json` (file sizes + sha256, manifest identity hash, row counts) is written last,
then the directory is renamed into place. Readers only ever see names matching PART_RE, so a
crash at any moment leaves either a complete part or an ignored temp dir.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alignti.errors import AlignTIError
from alignti.storage.files import FileLock, fsync_path, write_json_atomic
from alignti.storage.schema import PART_JSON, SCHEMA_VERSION

PART_RE = re.compile(r"^w(\d{4,})-(\d{6,})$")
TMP_PREFIX = ".tmp-"
LOCK_PREFIX = ".lock-"


def part_name(worker: int, n: int) -> str:
    return f"w{worker:04d}-{n:06d}"


def parse_part_name(name: str) -> tuple[int, int] | None:
    m = PART_RE.match(name)
    return (int(m.group(1)), int(m.group(2))) if m else None


@dataclass(frozen=True)
class PartInfo:
    """A committed part as described by its part.json."""

    name: str
    worker: int
    num_samples: int
    num_rejects: int
    manifest_hash: str
    committed_at: float
    rows: dict[str, int]  # ragged group -> total rows (resp, tpa, sal, iva)
    files: dict[str, dict[str, Any]]  # relative path -> {"size": int, "sha256": str}

    @classmethod
    def from_json(cls, name: str, text: bytes | str) -> PartInfo:
        try:
            d = json.loads(text)
            if d.get("schema_version") != SCHEMA_VERSION:
                raise AlignTIError(f"part {name}: part.json has schema_version {d.get('schema_version')!r}, "
                                   f"expected {SCHEMA_VERSION}")
            files = {str(k): {"size": int(v["size"]), "sha256": str(v["sha256"])} for k, v in d["files"].items()}
            return cls(name, int(d["worker"]), int(d["num_samples"]), int(d["num_rejects"]), str(d["manifest_hash"]),
                       float(d["committed_at"]), {str(k): int(v) for k, v in d["rows"].items()}, files)
        except AlignTIError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise AlignTIError(f"part {name}: part.json is malformed ({type(e).__name__}: {e})") from None

    def to_dict(self) -> dict[str, Any]:
        return {"schema_version": SCHEMA_VERSION, "name": self.name, "worker": self.worker,
                "num_samples": self.num_samples, "num_rejects": self.num_rejects,
                "manifest_hash": self.manifest_hash, "committed_at": self.committed_at,
                "rows": self.rows, "files": self.files}

    def file_bytes(self) -> int:
        return sum(f["size"] for f in self.files.values())


def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _seal_one(p: Path) -> dict[str, Any] | None:
    fsync_path(p)
    return None if p.is_dir() else {"size": p.stat().st_size, "sha256": sha256_file(p)}


def seal_dir(root: Path) -> dict[str, dict[str, Any]]:
    """fsync every file and directory under `root`; return {relative path: {size, sha256}}.

    A part has ~30 files and ~40 directories; fsyncs run in a thread pool (they release the GIL
    and a disk serves them concurrently), which makes a commit several times faster.
    """
    paths: list[Path] = []
    for dirpath, _, names in os.walk(root):
        paths.append(Path(dirpath))
        paths.extend(Path(dirpath) / n for n in sorted(names))
    with ThreadPoolExecutor(max_workers=16) as pool:
        infos = list(pool.map(_seal_one, paths))
    return {p.relative_to(root).as_posix(): info for p, info in zip(paths, infos) if info is not None}


def publish_part(tmp: Path, final: Path, info: PartInfo) -> None:
    """Write part.json into `tmp` (durably: that fsyncs `tmp` too), then atomically rename it to `final`."""
    write_json_atomic(tmp / PART_JSON, info.to_dict(), indent=1, sort_keys=True)
    os.rename(tmp, final)
    fsync_path(final.parent)


def clean_stale_temps(parts_dir: Path, worker: int) -> int:
    """Remove this worker's temp part dirs left by a crash; returns how many."""
    prefix = f"{TMP_PREFIX}w{worker:04d}-"
    stale = [p for p in parts_dir.iterdir() if p.name.startswith(prefix)] if parts_dir.is_dir() else []
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    return len(stale)


class WorkerLock(FileLock):
    """An exclusive flock on parts/.lock-w<worker>: one live writer per worker index (never stale:
    the kernel releases it when the process dies)."""

    def __init__(self, parts_dir: Path, worker: int) -> None:
        super().__init__(parts_dir / f"{LOCK_PREFIX}w{worker:04d}",
                         f"another process is already writing worker {worker} of this cache")
