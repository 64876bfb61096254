"""bench/scale.py --quick: the whole script runs at small widths and reports every figure the
real-width run must report, each with its target."""

from __future__ import annotations

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TARGETED = ("extract / bare teacher forwards (2 layers)", "extract / bare teacher forwards, extrapolated",
            "padded-vocab warning fires exactly when", "distill: KD / SFT step", "distill: Align-TI / SFT step",
            "distill: Align-TI / SFT peak memory", "distill: Align-TI / SFT step, extrapolated", "distill: first epoch streamed / from memory",
            "offline / online peak memory at the paper's sizes")
REPORTED = ("extract: seconds per sample", "cache bytes / sample, topk", "cache bytes / response token, tpa",
            "max teacher mass on ids", "distill: sft step seconds", "distill: alignti step peak RSS",
            "distill: ribbon token ratio")


def test_quick_run_reports_every_figure_with_its_target(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "bench"))  # as `python bench/scale.py` has it
    spec = importlib.util.spec_from_file_location("scale", REPO / "bench" / "scale.py")
    scale = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(scale)
    result = scale.main(["--quick", "--samples", "2", "--steps", "1", "--out", str(tmp_path / "scale.json")])
    rows = {r["figure"]: r for r in result["figures"]}
    for prefix in TARGETED + REPORTED:
        match = [r for name, r in rows.items() if name.startswith(prefix)]
        assert match, f"no figure {prefix!r}"
        if prefix in TARGETED:
            assert match[0]["target"] and match[0]["met"] is not None
    assert rows["padded-vocab warning fires exactly when ids >= 4,096 carry mass > 1e-6"]["met"]
    assert "offline = " in result["memory"]["formula"] and (tmp_path / "scale.json").exists()
