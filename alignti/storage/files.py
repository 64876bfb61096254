"""Durable small files: fsync, the one atomic JSON writer every command uses, write failures as one line.

A reader (or the next run after a crash or power loss) sees either the old file or the whole
new one, never half a file: the text goes to a temporary file in the same directory, which is
flushed and fsynced, renamed over the target (one directory, so the rename is atomic), and the
directory is fsynced so that the rename itself is durable.

A write that fails (disk full, permissions, a read-only file system) is the user's environment,
not a bug: `write_errors` turns it into one AlignTIError line naming the path, after removing the
half-written temporary directory; what was committed before stays valid.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import time
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from alignti.errors import AlignTIError


@contextlib.contextmanager
def write_errors(what: str, path: str | os.PathLike, temp: Path | None = None,
                 kinds: tuple[type[Exception], ...] = (OSError,)) -> Iterator[None]:
    """Writes of `what` (e.g. "cache part") to `path`: a failure first removes `temp` (the
    half-written temporary file or directory, when there is one); an exception of `kinds` then
    becomes one AlignTIError naming the path, the reason and the space left there (others, bugs,
    keep their traceback).

    Not every full disk is an OSError: torch.save raises RuntimeError ("unexpected pos ...") and
    safetensors a SafetensorError, so their callers pass those kinds too.
    """
    try:
        yield
    except Exception as e:
        if temp is not None and temp.is_dir():
            shutil.rmtree(temp, ignore_errors=True)
        elif temp is not None:
            temp.unlink(missing_ok=True)
        if isinstance(e, AlignTIError) or not isinstance(e, kinds):  # a nested write already named its file
            raise
        reason = e.strerror if isinstance(e, OSError) and e.strerror else " ".join(str(e).split())[:200]
        raise AlignTIError(f"cannot write {what} {os.fspath(path)}: {reason}{_space_left(Path(path))}") from None


def _space_left(path: Path) -> str:
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    try:
        return f" ({shutil.disk_usage(existing).free / 2**20:.1f} MiB free there)" if existing else ""
    except OSError:
        return ""


def fsync_path(path: Path) -> None:
    """fsync a file or a directory (directories: so renames and new entries are durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_atomic(path: Path, text: str, *, exclusive: bool = False) -> bool:
    """Replace `path` with `text` atomically and durably (module docstring).

    exclusive=True hard-links the temporary file instead of renaming it, so an existing `path` is
    never replaced: returns False, writing nothing, when `path` already exists (several workers
    racing to create one file: exactly one wins). Otherwise returns True. A failed write is an
    AlignTIError (`write_errors`) and leaves the old file.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with write_errors("file", path):
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            if exclusive:
                try:
                    os.link(tmp, path)
                except FileExistsError:
                    return False
            else:
                os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        fsync_path(path.parent)
    return True


def write_json_atomic(path: Path, obj: Any, *, exclusive: bool = False, **dump_kwargs: Any) -> bool:
    """`json.dumps(obj, **dump_kwargs)` plus a newline, written by `write_text_atomic`."""
    return write_text_atomic(path, json.dumps(obj, **dump_kwargs) + "\n", exclusive=exclusive)


class FileLock:
    """An exclusive `flock` on `path` (created if missing), which records the holder's pid: one live
    holder at a time. The kernel drops the lock when the process dies (SIGKILL included), so a dead
    run never blocks the next one. `busy` starts the AlignTIError a second process gets.

    A forked child (a DataLoader worker) would inherit the descriptor, and with it the lock, which
    would then outlive a killed holder until its workers notice; children close it at fork.

    With `remove=True` the file is deleted on release (a lock beside a user's directory should not
    outlive the run): a process that opened the file just before it was deleted would lock a dead
    inode, so acquiring retries until the locked file is the one at `path`.
    """

    def __init__(self, path: Path, busy: str, remove: bool = False) -> None:
        self.path, self._remove = Path(path), remove
        while True:
            with write_errors("lock file", self.path):
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 64).decode(errors="replace").split()
                os.close(fd)
                raise AlignTIError(f"{busy} ({self.path} is locked by pid {holder[0] if holder else '?'})") from None
            try:
                if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)  # deleted by its previous holder between our open and our lock: take the new one
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {time.time():.0f}\n".encode())
        self._fd = fd
        _HELD.add(self)

    def release(self) -> None:
        """Idempotent; with `remove`, the file goes before the lock does (nobody can lock it after)."""
        if self._fd < 0:
            return
        if self._remove:
            self.path.unlink(missing_ok=True)
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = -1
        _HELD.discard(self)

    def _drop_in_child(self) -> None:
        """In a forked child: close the inherited descriptor (the parent keeps the lock)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> FileLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


_HELD: weakref.WeakSet[FileLock] = weakref.WeakSet()  # the locks this process holds


def _drop_held_in_child() -> None:
    for lock in list(_HELD):
        lock._drop_in_child()


os.register_at_fork(after_in_child=_drop_held_in_child)
