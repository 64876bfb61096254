"""`alignti plot OUT`: one panel per computed loss series of OUT/log.jsonl, drawn into OUT/loss.png."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from alignti.cli import cli
from alignti.distill.plot import COLUMNS, PANEL_H, PANEL_W, plot_log, read_log, series
from alignti.errors import AlignTIError


def write_log(out, records, torn: bool = False):
    out.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r) + "\n" for r in records) + ('{"step": 9, "lo' if torn else "")
    (out / "log.jsonl").write_text(text)


def test_one_panel_per_computed_series(tmp_path):
    recs = [{"step": s, "epoch": 0, "lr": 1e-3, "loss": 5 * math.exp(-s / 10) + 0.1, "sft": 2.0 - s / 100,
             "kd": 0.1 * math.exp(-s / 5), "tpa": 1.0, "tokens": 10} for s in range(1, 41)]
    write_log(tmp_path, recs, torn=True)  # a line torn by a kill is skipped
    assert len(read_log(tmp_path)) == 40
    got = series(read_log(tmp_path))
    assert list(got) == ["loss", "sft", "kd", "tpa"]  # not lr/tokens; iva and ground were not computed
    assert got["kd"][0] == list(range(1, 41)) and got["kd"][1][0] == pytest.approx(0.1 * math.exp(-0.2))
    res = CliRunner().invoke(cli, ["plot", str(tmp_path)], catch_exceptions=False)
    assert res.exit_code == 0 and json.loads(res.output)["series"] == ["loss", "sft", "kd", "tpa"]
    img = np.asarray(Image.open(tmp_path / "loss.png").convert("RGB"))
    assert img.shape[:2] == (34 + 2 * PANEL_H, COLUMNS * PANEL_W)
    # every panel has its curve drawn in it (dark blue pixels inside each panel's frame)
    for i in range(4):
        y0, x0 = 34 + (i // COLUMNS) * PANEL_H, (i % COLUMNS) * PANEL_W
        panel = img[y0 + 35:y0 + PANEL_H - 45, x0 + 75:x0 + PANEL_W - 20].astype(int)
        blue = (panel[..., 2] > 100) & (panel[..., 0] < 100) & (panel[..., 1] < 100)
        assert blue.sum() > 50, i


def test_single_step_and_empty_logs(tmp_path):
    write_log(tmp_path / "one", [{"step": 1, "loss": 2.0, "sft": 2.0}])
    assert plot_log(tmp_path / "one").is_file()
    write_log(tmp_path / "none", [])
    assert plot_log(tmp_path / "none") is None
    with pytest.raises(AlignTIError, match="no step"):
        CliRunner().invoke(cli, ["plot", str(tmp_path / "none")], standalone_mode=False, catch_exceptions=False)
    with pytest.raises(AlignTIError, match="cannot read"):
        plot_log(tmp_path / "missing")
