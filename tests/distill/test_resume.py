"""Kill `distill` with SIGKILL after a checkpoint, resume it, and get bit-identical weights and log
(and a TensorBoard run that reads as one run): on the LLaVA world, with micro-batches built in the
training process and in loader workers, and on one Qwen-VL family (Qwen2.5-VL: M-RoPE ribbon, three
image sizes; the other two share every line of the loop, so one keeps the suite's time down)."""

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
from tests.helpers.families import family_world

TIMING = {"tokens_per_second", "elapsed"}
# world -> (steps of batch 2 in one epoch, checkpoints kept at the end with save_every 3, keep 2)
PLANS = {"llava": (12, ["step-6", "step-9"]), "qwen2_5_vl": (8, ["step-3", "step-6"])}


@pytest.fixture(scope="module", params=sorted(PLANS))
def world(request, tmp_path_factory):
    if request.param == "llava":
        return request.param, run_world(tmp_path_factory), PLANS["llava"]
    return request.param, family_world(tmp_path_factory, request.param), PLANS[request.param]


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


@pytest.fixture(scope="module")
def reference(world, tmp_path_factory) -> Path:
    """The uninterrupted run (micro-batches built in the training process)."""
    _, w, (steps, _) = world
    ref = tmp_path_factory.mktemp("resume-ref") / "ref"
    assert run_to_end(config(w, ref, num_workers=0))["steps"] == steps  # samples / batch 2
    return ref


@pytest.mark.timeout(300)
@pytest.mark.parametrize("workers", [0, 2])
def test_sigkill_then_resume_equals_uninterrupted(world, reference, tmp_path, workers):
    name, world, (steps, kept) = world
    if name != "llava" and workers:
        pytest.skip("loader workers are family-independent: checked on the LLaVA world")
    # Every run in a fresh subprocess with the same environment (same thread count, so the same
    # floating-point reduction order).
    ref = reference
    out = tmp_path / "killed"
    tracked = importlib.util.find_spec("tensorboard") is not None  # in the dev extra
    report = {"report_to": "tensorboard"} if tracked else {}  # does not change what is computed
    proc = subprocess.Popen(distill_cli(**config(world, out, num_workers=workers, **report)),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
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
    assert killed_at < steps

    # without --resume the existing output is refused; a changed option is refused on resume
    with pytest.raises(AlignTIError, match="already exists"):
        run_distill(distill_config(**config(world, out, num_workers=workers)))
    with pytest.raises(AlignTIError, match="lr"):
        run_distill(distill_config(**config(world, out, lr=2e-3, resume=True, num_workers=workers)))

    summary = run_to_end(config(world, out, resume=True, num_workers=workers, **report))
    assert summary["resumed_from"].endswith(f"step-{killed_at}")
    assert summary["steps_this_run"] == steps - killed_at
    a, b = weights(ref / "final"), weights(out / "final")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # the log reads as one run: steps logged after the last checkpoint by the killed run are gone
    assert strip_timing(read_log(out)) == strip_timing(read_log(ref))
    assert [c.name for c in list_checkpoints(out)] == kept  # keep_checkpoints=2
    if tracked:  # the resumed run appended to the same TensorBoard run, the killed run's extra steps hidden
        from tests.distill.test_runfiles import tensorboard_scalars

        loss = tensorboard_scalars(out / "tensorboard")["train/loss"]
        assert [s for s, _ in loss] == list(range(1, steps + 1))
        assert [v for _, v in loss] == pytest.approx([r["loss"] for r in read_log(out)], rel=1e-6)
