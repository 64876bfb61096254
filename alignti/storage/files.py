"""Durable small files: fsync, and the one atomic JSON writer every command uses.

A reader (or the next run after a crash or power loss) sees either the old file or the whole
new one, never half a file: the text goes to a temporary file in the same directory, which is
flushed and fsynced, renamed over the target (one directory, so the rename is atomic), and the
directory is fsynced so that the rename itself is durable.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


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
    racing to create one file: exactly one wins). Otherwise returns True.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
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
