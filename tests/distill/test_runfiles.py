"""`alignti distill` run files, trackers and the loss plot, through the command line users run.

- a run given as flags, the same run from a hand-written run file (a flag overriding one of its
  values) and a rerun of the `OUT/distill.yaml` the first run wrote log the same losses;
- `--report-to tensorboard` writes an event file holding every computed term, lr, grad norm and
  tokens/s per step;
- `OUT/loss.png` exists after the run and shows one panel per computed series.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest
from PIL import Image

from alignti.distill.config import TERMS
from alignti.errors import AlignTIError
from tests.distill.worlds import distill_cli, distill_config, read_log, run_world

TIMING = {"tokens_per_second", "elapsed"}
DISTILL = [sys.executable, "-m", "alignti", "distill"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return run_world(tmp_path_factory)


def losses(out) -> list[dict]:
    return [{k: v for k, v in rec.items() if k not in TIMING} for rec in read_log(out)]


def run(argv: list[str]) -> None:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def tensorboard_scalars(logdir) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.mark.timeout(600)
def test_run_file_equals_flags_and_reruns_the_run(world, tmp_path):
    pytest.importorskip("tensorboard")
    base = dict(cache=str(world.small_cache), student=str(world.student), lr=3e-3, warmup_ratio=0.0, batch_size=2,
                epochs=2, max_steps=3, save_every=0, progress=False, seed=3, kd_weight=0.5, tpa_weighting="uniform")
    flags = tmp_path / "flags"
    run(distill_cli(out=str(flags), report_to="tensorboard", **base))

    # a hand-written run file (dashed and underscored names, YAML types) with one value overridden by a flag
    run_yaml = tmp_path / "run.yaml"
    run_yaml.write_text(f"# my run\ncache: {world.small_cache}\nstudent: {world.student}\nout: {tmp_path / 'file'}\n"
                        "lr: 3e-3\nwarmup-ratio: 0\nbatch_size: 2\nepochs: 2\nmax-steps: 50\nsave-every: 0\nprogress: false\n"
                        "seed: 3\nkd-weight: 0.5\ntpa_weighting: uniform\n")
    run(DISTILL + ["--config", str(run_yaml), "--max-steps", "3"])
    # the run file the first run wrote, into another directory
    written = flags / "distill.yaml"
    assert written.read_text().startswith("# alignti distill:")
    run(DISTILL + ["--config", str(written), "--out", str(tmp_path / "rerun")])

    ref = losses(flags)
    assert len(ref) == 3 and all({"sft", "kd", "iva", "tpa"} <= set(r) for r in ref)
    assert losses(tmp_path / "file") == ref
    assert losses(tmp_path / "rerun") == ref

    # TensorBoard: every term computed, the total, lr, grad norm and tokens/s, at every step
    scalars = tensorboard_scalars(flags / "tensorboard")
    for name in ("loss", "lr", "grad_norm", "tokens_per_second") + tuple(n for n in TERMS if n in ref[0]):
        assert [s for s, _ in scalars[f"train/{name}"]] == [1, 2, 3], name
    for rec, (_, kd) in zip(ref, scalars["train/kd"]):
        assert kd == pytest.approx(rec["kd"], rel=1e-6)
    assert "train/ground" not in scalars  # weight 0: not computed, not logged

    # the loss plot: one panel per computed series (loss, sft, kd, iva, tpa: 3 rows of 2)
    png = Image.open(flags / "loss.png")
    assert png.size[0] > 600 and png.size[1] > 3 * 200
    assert not (tmp_path / "file" / "tensorboard").exists()  # --report-to none


def test_report_to_a_missing_package_is_one_error_before_any_work(world, tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(AlignTIError, match=r"alignti\[wandb\]"):
        distill_config(cache=str(world.small_cache), student=str(world.student), out=str(tmp_path / "o"),
                       report_to="wandb")
    assert not (tmp_path / "o").exists()


def test_wandb_offline(world, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    out = tmp_path / "o"
    run(distill_cli(cache=str(world.small_cache), student=str(world.student), out=str(out), max_steps=2,
                    save_every=0, progress=False, report_to="wandb"))
    assert list((out / "wandb").glob("offline-run-*"))
