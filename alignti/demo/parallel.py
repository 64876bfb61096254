"""Several independent distillations at once, one process each (e.g. the demo's six students on a
2-core laptop): one progress bar over all their steps, one line per finished run.

Each run is the `alignti distill` command line of its config (`cliargs.to_argv`), so it goes
through the same parsing and one-line errors as a user's run, with `threads` torch threads; its
stderr (warnings, errors) goes to `<out>.log` beside its output directory.
Tiny models gain nothing from intra-op threads, so N single-threaded runs on N cores finish about
N times sooner.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

from tqdm import tqdm

from alignti.cliargs import to_argv
from alignti.distill import checkpoint as ckpt
from alignti.distill.config import DistillConfig
from alignti.errors import AlignTIError
from alignti.progress import progress_bar


def _log_path(cfg: DistillConfig) -> Path:
    out = Path(cfg.out)
    return out.parent / f"{out.name}.log"


def _start(cfg: DistillConfig, threads: int) -> tuple[subprocess.Popen, IO[str]]:
    """The run's process and its open stderr log (closed by the caller when the run ends)."""
    _log_path(cfg).parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    argv = to_argv(dataclasses.replace(cfg, progress=False))
    log = open(_log_path(cfg), "w")
    # stdout carries a start-up line and the JSON summary only: small enough for the pipe buffer.
    proc = subprocess.Popen([sys.executable, "-m", "alignti", "distill", *argv], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=log)
    return proc, log


def _steps_done(cfg: DistillConfig) -> int:
    log = Path(cfg.out) / ckpt.LOG
    try:
        return log.read_text(encoding="utf-8").count("\n")
    except FileNotFoundError:
        return 0


def run_many(configs: list[DistillConfig], names: list[str], jobs: int, threads: int = 1) -> list[dict]:
    """Run every config, `jobs` at a time; returns their summaries in order. A failed run raises
    with the tail of its stderr log (the runs still going are stopped first)."""
    pending, running, results = list(range(len(configs))), {}, [None] * len(configs)
    bar = progress_bar(total=sum(c.max_steps or 0 for c in configs) or None, desc="distill", unit="step")
    done_steps = 0
    try:
        while pending or running:
            while pending and len(running) < max(1, jobs):
                i = pending.pop(0)
                running[i] = (*_start(configs[i], threads), time.time())
            time.sleep(0.5)
            for i, (proc, log, t0) in list(running.items()):
                if proc.poll() is None:
                    continue
                out = proc.stdout.read()
                log.close()
                del running[i]
                if proc.returncode != 0:
                    tail = _log_path(configs[i]).read_text(errors="replace").strip().splitlines()[-3:]
                    raise AlignTIError(f"distillation {names[i]} failed (exit {proc.returncode}): {' | '.join(tail)}")
                lines = out.splitlines()
                results[i] = json.loads("\n".join(lines[max(j for j, line in enumerate(lines) if line == "{"):]))
                done_steps += results[i]["steps"]
                tqdm.write(f"  {names[i]}: {results[i]['steps']} steps in {time.time() - t0:.1f}s, "
                           f"final loss {results[i]['final_losses'].get('loss', float('nan')):.3f}")
            bar.update(done_steps + sum(_steps_done(configs[i]) for i in running) - bar.n)
    finally:
        for proc, log, _ in running.values():  # only after a failure or an interrupt
            proc.kill()
            proc.wait()
            log.close()
        bar.close()
    return results
