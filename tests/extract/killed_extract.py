"""Subprocess `alignti extract` that SIGKILLs itself at a chosen commit, for the kill + resume test.

    python -m tests.extract.killed_extract after:w0000-000001 extract --teacher ... [--resume]
    python -m tests.extract.killed_extract before:w0000-000025 extract ...
    python -m tests.extract.killed_extract never extract ...

`after:NAME`: killed right after part NAME is published, so the teacher batch being written is
cut in the middle (part of it committed, the rest lost with the writer's buffer).
`before:NAME`: killed inside the commit of part NAME, its temp dir complete but not renamed.
A SIGKILL the process sends itself is a real one (no cleanup, no atexit, no `finally`) and lands
at an exact point, without the race of a kill sent from outside at a guessed time. One torch
thread, as in the in-process tests, so the numbers match an in-process run bit for bit.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import torch

import alignti.storage.writer as writer_mod
from alignti.cli import main


def kill_at(when: str, name: str) -> None:
    publish = writer_mod.publish_part

    def publish_or_die(tmp: Path, final: Path, info: object) -> None:
        if when == "before" and final.name == name:
            os.kill(os.getpid(), signal.SIGKILL)
        publish(tmp, final, info)
        if when == "after" and final.name == name:
            os.kill(os.getpid(), signal.SIGKILL)

    writer_mod.publish_part = publish_or_die


if __name__ == "__main__":
    torch.set_num_threads(1)
    spec, args = sys.argv[1], sys.argv[2:]
    if spec != "never":
        when, _, part = spec.partition(":")
        assert when in ("after", "before") and part, spec
        kill_at(when, part)
    sys.argv = ["alignti", *args]
    main()
