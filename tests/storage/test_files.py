"""The one atomic JSON writer: whole old file or whole new one, exclusive creation, no temp left."""

import errno
import json
import os

import pytest

from alignti.errors import AlignTIError
from alignti.storage import files
from alignti.storage.files import write_json_atomic


def test_replaces_and_leaves_no_temp(tmp_path):
    p = tmp_path / "a.json"
    assert write_json_atomic(p, {"b": 1, "a": [1, 2]}, indent=1, sort_keys=True)
    assert p.read_text() == json.dumps({"a": [1, 2], "b": 1}, indent=1, sort_keys=True) + "\n"
    assert write_json_atomic(p, {"x": "é"}, ensure_ascii=False)
    assert json.loads(p.read_text(encoding="utf-8")) == {"x": "é"}
    assert os.listdir(tmp_path) == ["a.json"]


def test_exclusive_never_clobbers(tmp_path):
    p = tmp_path / "cache.json"
    assert write_json_atomic(p, {"first": True}, exclusive=True)
    assert not write_json_atomic(p, {"second": True}, exclusive=True)
    assert json.loads(p.read_text()) == {"first": True} and os.listdir(tmp_path) == ["cache.json"]


def test_a_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    p = tmp_path / "state.json"
    write_json_atomic(p, {"step": 1})

    def crash(src, dst):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(files.os, "replace", crash)
    # one line naming the file, the reason and the space left (not a traceback)
    with pytest.raises(AlignTIError, match=r"cannot write file .*state\.json: No space left on device \(.* MiB free"):
        write_json_atomic(p, {"step": 2})
    assert json.loads(p.read_text()) == {"step": 1} and os.listdir(tmp_path) == ["state.json"]


def test_a_killed_holders_forked_children_do_not_keep_its_lock(tmp_path):
    """A run SIGKILLed while its DataLoader workers (forked children) live: the next run gets the lock."""
    import signal
    import subprocess
    import sys
    import time

    lock = tmp_path / ".out.lock"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import os, sys, time; from pathlib import Path; from alignti.storage.files import FileLock\n"
        f"held = FileLock(Path({str(lock)!r}), 'busy')\n"
        "if os.fork() == 0: time.sleep(10); os._exit(0)\n"  # a worker that outlives its parent
        "print('locked', flush=True); time.sleep(60)")], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(AlignTIError, match="busy"):
        files.FileLock(lock, "busy")
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    time.sleep(0.2)
    files.FileLock(lock, "busy").release()  # the orphaned child sleeps on, without the lock
