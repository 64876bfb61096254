"""Creating, resuming and overwriting a cache root: the cache.json protocol between workers.

- fresh (no flags): the first worker creates cache.json (write temp, fsync, hard-link: atomic and
  never clobbers). A cache.json that already exists is accepted only when several workers were
  launched (num_workers > 1), its identity equals ours and it was created at most
  SIBLING_GRACE_S before this process started (a sibling of the same launch); otherwise
  "already exists, pass resume or overwrite".
- resume: cache.json must have our identity (schema version, teacher fingerprint, settings,
  encoding); any difference is an error naming the fields, and nothing is touched.
- overwrite: worker 0 deletes its own parts and those of worker indices >= num_workers, then
  atomically replaces cache.json; worker i > 0 deletes its own parts and waits (up to
  SIBLING_WAIT_S) for a cache.json with our identity created by this launch.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from alignti.errors import AlignTIError
from alignti.storage.files import write_json_atomic
from alignti.storage.parts import LOCK_PREFIX, parse_part_name
from alignti.storage.schema import CACHE_JSON, PARTS_DIR, CacheManifest, manifest_differences

SIBLING_GRACE_S = 600.0
SIBLING_WAIT_S = 600.0
_POLL_S = 0.2
PROCESS_START = time.time()


def local_root(path: str | os.PathLike) -> Path:
    """Writers need a local directory; file:// URLs are accepted."""
    s = os.fspath(path)
    if s.startswith("file://"):
        s = s[len("file://"):]
    elif "://" in s:
        raise AlignTIError(f"cannot write a cache to {s}: writing needs a local path")
    return Path(s)


def load_existing(root: Path) -> CacheManifest | None:
    p = root / CACHE_JSON
    if not p.exists():
        return None
    try:
        d = json.loads(p.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise AlignTIError(f"{p} is not valid JSON ({e})") from None
    return CacheManifest.from_dict(d, where=str(p))


def _require_same(existing: CacheManifest, ours: CacheManifest, root: Path, action: str) -> None:
    diffs = manifest_differences(existing, ours)
    if diffs:
        shown = "; ".join(diffs[:4]) + (f"; +{len(diffs) - 4} more" if len(diffs) > 4 else "")
        raise AlignTIError(f"cannot {action} {root}: it was extracted with different teacher/settings "
                           f"(cache vs this run: {shown})")


def _only_our_locks(p: Path) -> bool:
    """A parts/ directory holding nothing but worker lock files: what a writer creates (to lock
    its worker index) before cache.json exists, e.g. `--overwrite` on a new path."""
    return p.name == PARTS_DIR and p.is_dir() and all(c.name.startswith(LOCK_PREFIX) for c in p.iterdir())


def check_root_is_ours(root: Path) -> None:
    if root.exists() and not root.is_dir():
        raise AlignTIError(f"{root} exists and is not a directory")
    leftovers = [p for p in root.iterdir() if not p.name.startswith(f".{CACHE_JSON}.") and not _only_our_locks(p)
                 ] if root.is_dir() else []
    if leftovers and not (root / CACHE_JSON).exists():
        raise AlignTIError(f"{root} exists, is not empty and is not an alignti cache (no {CACHE_JSON}); "
                           f"refusing to write into it")


def _create_manifest(root: Path, manifest: CacheManifest, replace: bool) -> bool:
    """Write cache.json atomically; False if another process created it first (replace=False)."""
    root.mkdir(parents=True, exist_ok=True)
    stamped = dataclasses.replace(manifest, created_at=time.time())
    return write_json_atomic(root / CACHE_JSON, stamped.to_dict(), exclusive=not replace, indent=1, sort_keys=True)


def _accept_sibling(existing: CacheManifest, ours: CacheManifest | None, root: Path, num_workers: int) -> None:
    """A fresh run finding cache.json: fine only for a sibling worker of the same launch (same
    identity; `ours` None: not known yet, checked again later)."""
    recent = existing.created_at >= PROCESS_START - SIBLING_GRACE_S
    if num_workers > 1 and recent:
        if ours is not None:
            _require_same(existing, ours, root, "join")
        return
    raise AlignTIError(f"{root} already holds a cache; pass --resume to continue it or --overwrite to replace it")


def check_can_open(root: Path, num_workers: int, *, resume: bool, overwrite: bool) -> None:
    """The refusals of `prepare_root` that need no manifest (not a cache, a cache without resume or
    overwrite), read-only: extract checks them before the teacher loads and IRS runs."""
    check_root_is_ours(root)
    existing = None if resume or overwrite else load_existing(root)  # overwrite: it may be of another version
    if existing is not None:
        _accept_sibling(existing, None, root, num_workers)


def _wait_for_manifest(root: Path, ours: CacheManifest) -> None:
    deadline = time.time() + SIBLING_WAIT_S
    while time.time() < deadline:
        try:
            existing = load_existing(root)
        except AlignTIError:  # the old cache.json, not yet replaced by worker 0
            existing = None
        if existing is not None and existing.created_at >= PROCESS_START - SIBLING_GRACE_S \
                and not manifest_differences(existing, ours):
            return
        time.sleep(_POLL_S)
    raise AlignTIError(f"worker 0 did not create {root / CACHE_JSON} within {SIBLING_WAIT_S:.0f} s")


def remove_parts(root: Path, keep: Callable[[int], bool]) -> int:
    """Delete committed and temp part dirs whose worker index fails keep(worker)."""
    pdir = root / PARTS_DIR
    removed = 0
    for p in list(pdir.iterdir()) if pdir.is_dir() else []:
        name = p.name[len(".tmp-"):].rsplit("-", 1)[0] if p.name.startswith(".tmp-") else p.name
        parsed = parse_part_name(name)
        if parsed is not None and not keep(parsed[0]):
            shutil.rmtree(p)
            removed += 1
    return removed


def prepare_root(root: Path, manifest: CacheManifest, *, worker: int, num_workers: int, resume: bool,
                 overwrite: bool) -> None:
    """Bring `root` to a state where this worker may add parts (see module docstring)."""
    if resume and overwrite:
        raise ValueError("resume and overwrite are mutually exclusive")
    check_root_is_ours(root)
    if overwrite:  # the old cache.json is not even parsed: it may be of another schema version
        if worker == 0:
            remove_parts(root, keep=lambda w: 0 < w < num_workers)
            _create_manifest(root, manifest, replace=True)
        else:
            remove_parts(root, keep=lambda w: w != worker)
            _wait_for_manifest(root, manifest)
        return
    existing = load_existing(root)
    if existing is None and _create_manifest(root, manifest, replace=False):
        return
    existing = existing or load_existing(root)
    assert existing is not None
    if resume:
        _require_same(existing, manifest, root, "resume")
    else:
        _accept_sibling(existing, manifest, root, num_workers)
