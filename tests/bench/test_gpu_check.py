"""bench/gpu_check.py: without CUDA it says so and exits 0; its checks run on CPU at small widths."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]


def load_gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "bench" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_without_cuda_it_says_so_and_exits_0(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert load_gpu_check().main(["--out", str(tmp_path / "gpu.json")]) == 0
    assert "no CUDA device" in capsys.readouterr().out
    assert not (tmp_path / "gpu.json").exists()  # nothing was checked, so nothing is reported


def test_dry_run_on_cpu_passes_its_checks(tmp_path):
    out = tmp_path / "gpu.json"
    code = load_gpu_check().main(["--device", "cpu", "--quick", "--layers", "2", "--samples", "2", "--steps", "1",
                                  "--batch-size", "1", "--out", str(out)])
    result = json.loads(out.read_text())
    assert code == 0 and result["ok"], result
    assert result["ribbon_fp32"]["sensitive"]  # the fp32 comparison could have failed
    assert result["pipeline"]["losses_finite"] and result["pipeline"]["extract_seconds_per_sample"] > 0
