"""Checkpoint files: a full disk while saving is one line (older checkpoints stay valid and resumable),
and a checkpoint file that is not plain tensor data is refused in one line."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError

from alignti.cli import main
from alignti.cliargs import to_argv
from alignti.distill import checkpoint as ckpt
from alignti.distill.train import run_distill
from alignti.errors import AlignTIError
from tests.distill.worlds import distill_config, run_world


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return run_world(tmp_path_factory)


def test_disk_full_while_saving_a_checkpoint(world, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    cfg = distill_config(cache=str(world.small_cache), student=str(world.student), out=str(out), recipe="kd",
                         batch_size=1, save_every=1, keep_checkpoints=0, progress=False)  # 4 steps
    real_save_file, calls = ckpt.save_file, []

    def full_on_second(tensors, path):  # what safetensors raises on a full disk
        calls.append(path)
        if len(calls) == 2:
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        real_save_file(tensors, path)

    monkeypatch.setattr(ckpt, "save_file", full_on_second)
    monkeypatch.setattr(sys, "argv", ["alignti", "distill", *to_argv(cfg)])
    with pytest.raises(SystemExit) as exit_info:
        main()
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"alignti: error: cannot write checkpoint {out / 'checkpoints' / 'step-2'}: Error while "
                          f"serializing: I/O error: No space left on device (os error 28) (")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-1"]  # no temp dir left
    monkeypatch.setattr(ckpt, "save_file", real_save_file)  # space freed: step-1 resumes
    summary = run_distill(dataclasses.replace(cfg, resume=True))
    assert summary["resumed_from"] == str(out / "checkpoints" / "step-1") and summary["steps_this_run"] == 3


def test_a_pickled_checkpoint_file_is_refused_in_one_line(tmp_path):
    path = tmp_path / "rng-0.pt"
    torch.save({"cpu": torch.get_rng_state(), "code": Path("/etc/passwd")}, path)  # not plain data
    with pytest.raises(AlignTIError) as e:
        ckpt.load_rank_rng(tmp_path, 0)
    assert str(e.value) == f"cannot read {str(path)!r}: it is not plain tensor data (a pickle of other objects) " \
                           f"and is refused"
