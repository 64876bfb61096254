"""Kill `distill` with SIGKILL after a checkpoint, resume it, and get bit-identical weights and log
(and a TensorBoard run that reads as one run)."""

from __future__ import annotations

import importlib.util
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from alignti.distill.checkpoint import list_checkpoints
from alignti.distill.train import run_distill
from alignti.errors import AlignTIError
from tests.distill.worlds import cli_summary, distill_cli, distill_config, read_log, run_world, weights

TIMING = {"tokens_per_second", "elapsed"}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return run_world(tmp_path_factory)


def config(world, out: Path, **kw) -> dict:
    base = dict(cache=str(world.cache), student=str(world.student), out=str(out), recipe="alignti", lr=1e-3,
                warmup_steps=2, batch_size=2, epochs=1, save_every=3, keep_checkpoints=2, progress=False, seed=5)
    base.update(kw)
    return base


def run_to_end(cfg: dict) -> dict:
    done = subprocess.run(distill_cli(**cfg), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return cli_summary(done.stdout)


def strip_timing(log: list[dict]) -> list[dict]:
    return [{k: v for k, v in rec.items() if k not in TIMING} for rec in log]


@pytest.mark.timeout(300)
def test_sigkill_then_resume_equals_uninterrupted(world, tmp_path):
    # Both runs in fresh subprocesses with the same environment (same thread count, so the same
    # floating-point reduction order).
    ref = tmp_path / "ref"
    ref_summary = run_to_end(config(world, ref))
    assert ref_summary["steps"] == 12  # 24 samples / batch 2

    out = tmp_path / "killed"
    tracked = importlib.util.find_spec("tensorboard") is not None  # in the dev extra
    report = {"report_to": "tensorboard"} if tracked else {}  # does not change what is computed
    proc = subprocess.Popen(distill_cli(**config(world, out, **report)), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 240

    def logged_past_checkpoint() -> bool:  # the kill then loses steps the resumed run must redo
        found = list_checkpoints(out)
        lines = (out / "log.jsonl").read_text().count("\n") if (out / "log.jsonl").is_file() else 0
        return bool(found) and lines > int(found[-1].name.split("-")[1])

    while time.time() < deadline and proc.poll() is None and not logged_past_checkpoint():
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert list_checkpoints(out) and not (out / "final").exists()
    killed_at = int(list_checkpoints(out)[-1].name.split("-")[1])
    assert killed_at < 12

    # without --resume the existing output is refused; a changed option is refused on resume
    with pytest.raises(AlignTIError, match="already exists"):
        run_distill(distill_config(**config(world, out)))
    with pytest.raises(AlignTIError, match="lr"):
        run_distill(distill_config(**config(world, out, lr=2e-3, resume=True)))

    summary = run_to_end(config(world, out, resume=True, **report))
    assert summary["resumed_from"].endswith(f"step-{killed_at}")
    assert summary["steps_this_run"] == 12 - killed_at
    a, b = weights(ref / "final"), weights(out / "final")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # the log reads as one run: steps logged after the last checkpoint by the killed run are gone
    assert strip_timing(read_log(out)) == strip_timing(read_log(ref))
    assert [c.name for c in list_checkpoints(out)] == ["step-6", "step-9"]  # keep_checkpoints=2
    if tracked:  # the resumed run appended to the same TensorBoard run, the killed run's extra steps hidden
        from tests.distill.test_runfiles import tensorboard_scalars

        loss = tensorboard_scalars(out / "tensorboard")["train/loss"]
        assert [s for s, _ in loss] == list(range(1, 13))
        assert [v for _, v in loss] == pytest.approx([r["loss"] for r in read_log(out)], rel=1e-6)
