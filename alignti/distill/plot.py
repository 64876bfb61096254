"""`alignti plot OUT`: every loss term of a distill run against the step, as `OUT/loss.png`.

Reads `OUT/log.jsonl` (what the run computed: the weighted total and each term with a weight)
and draws one panel per series, small multiples, each on its own y axis: linear, or logarithmic
when the series spans an order of magnitude or more. Noisy series (more than 20 steps) are drawn
raw in a light colour with an exponential moving average over them. PIL only. `alignti distill`
draws it at the end of every run.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from alignti.distill.checkpoint import LOG
from alignti.distill.config import TERMS, PlotConfig
from alignti.errors import AlignTIError

PNG = "loss.png"
SERIES = ("loss",) + TERMS  # the weighted total, then the terms
TITLES = {"loss": "loss (weighted total)", "sft": "sft (L_sft)", "kd": "kd (L_kd)", "iva": "iva (L_iva)",
          "tpa": "tpa (L_tpa)", "ground": "ground (grounding)"}
PANEL_W, PANEL_H, COLUMNS = 460, 250, 2
MARGIN_L, MARGIN_R, MARGIN_T, MARGIN_B = 70, 16, 30, 42


def read_log(out: str | Path) -> list[dict[str, Any]]:
    """The step records of OUT/log.jsonl (a line torn by a kill is skipped)."""
    path = Path(out) / LOG
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise AlignTIError(f"cannot read {path}: {e.strerror or e} (is {str(out)!r} a distill output?)") from None
    records = []
    for line in lines:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and "step" in rec:
            records.append(rec)
    return records


def series(records: list[dict[str, Any]]) -> dict[str, tuple[list[int], list[float]]]:
    """{name: (steps, values)} of every loss series some step computed, in SERIES order."""
    out = {}
    for name in SERIES:
        pts = [(int(r["step"]), float(r[name])) for r in records
               if isinstance(r.get(name), (int, float)) and math.isfinite(r[name])]
        if pts:
            out[name] = ([s for s, _ in pts], [v for _, v in pts])
    return out


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About n round values covering [lo, hi] (1, 2 or 5 times a power of ten apart)."""
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    return [k * step for k in range(math.ceil(lo / step - 1e-9), math.floor(hi / step + 1e-9) + 1)]


def _log_ticks(lo: float, hi: float) -> list[float]:
    """Powers of ten in [lo, hi], with 2x and 5x between them when the range spans few decades."""
    decades = range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)
    for mults in ((1, 2, 5), (1,)):
        ticks = [m * 10.0 ** e for e in decades for m in mults if lo <= m * 10.0 ** e <= hi]
        if len(ticks) <= 6:
            return ticks
    return ticks[:: math.ceil(len(ticks) / 6)]


def _fmt(v: float) -> str:
    return f"{v:.3g}" if v == 0 or 1e-3 <= abs(v) < 1e4 else f"{v:.0e}"


def _ema(values: list[float], span: int) -> list[float]:
    alpha, out, acc = 2.0 / (span + 1), [], values[0]
    for v in values:
        acc = alpha * v + (1 - alpha) * acc
        out.append(acc)
    return out


def draw_panel(draw: ImageDraw.ImageDraw, x0: int, y0: int, title: str, steps: list[int], values: list[float],
               fonts: tuple[Any, Any]) -> None:
    """One series in the panel whose top-left corner is (x0, y0)."""
    big, small = fonts
    left, top = x0 + MARGIN_L, y0 + MARGIN_T
    right, bottom = x0 + PANEL_W - MARGIN_R, y0 + PANEL_H - MARGIN_B
    lo, hi = min(values), max(values)
    log_y = lo > 0 and hi / lo >= 10
    f = math.log10 if log_y else (lambda v: v)
    flo, fhi = f(lo), f(hi)
    if fhi - flo < 1e-12:  # a flat series: a band around it
        flo, fhi = flo - 0.5 * (abs(flo) or 1), fhi + 0.5 * (abs(fhi) or 1)
    pad = 0.05 * (fhi - flo)  # the curve clear of the frame
    flo, fhi = flo - pad, fhi + pad
    s_lo, s_hi = steps[0], max(steps[-1], steps[0] + 1)

    def xy(s: float, v: float) -> tuple[float, float]:
        return (left + (right - left) * (s - s_lo) / (s_hi - s_lo), bottom - (bottom - top) * (f(v) - flo) / (fhi - flo))

    draw.rectangle([left, top, right, bottom], outline="black")
    yticks = _log_ticks(10 ** flo, 10 ** fhi) if log_y else _ticks(flo, fhi)
    for v in yticks:
        _, y = xy(s_lo, v)
        draw.line([left, y, right, y], fill=(225, 225, 225))
        draw.text((left - 6, y), _fmt(v), fill="black", font=small, anchor="rm")
    for s in _ticks(s_lo, s_hi):
        x, _ = xy(s, lo)
        draw.line([x, bottom, x, bottom + 4], fill="black")
        draw.text((x, bottom + 6), f"{s:g}", fill="black", font=small, anchor="mt")
    draw.text(((left + right) / 2, y0 + PANEL_H - 4), "step", fill="black", font=small, anchor="mb")
    scale = ", log scale" if log_y else ""
    draw.text((left, y0 + 6), f"{title}: last {_fmt(values[-1])}{scale}", fill="black", font=big)
    smooth = len(values) > 20
    pts = [xy(s, v) for s, v in zip(steps, values)]
    draw.line(pts, fill=(160, 190, 230) if smooth else "steelblue", width=1 if smooth else 2)
    if smooth:
        draw.line([xy(s, v) for s, v in zip(steps, _ema(values, max(5, len(values) // 20)))], fill="navy", width=2)
    if len(pts) == 1:
        draw.ellipse([pts[0][0] - 3, pts[0][1] - 3, pts[0][0] + 3, pts[0][1] + 3], fill="steelblue")


def plot_log(out: str | Path, png: str | Path | None = None) -> Path | None:
    """Draw OUT/log.jsonl's loss series into `png` (default OUT/loss.png); None if no step was logged."""
    data = series(read_log(out))
    if not data:
        return None
    rows = math.ceil(len(data) / COLUMNS)
    img = Image.new("RGB", (PANEL_W * min(COLUMNS, len(data)), 34 + rows * PANEL_H), "white")
    draw = ImageDraw.Draw(img)
    fonts = (_font(15), _font(12))
    steps = max(s[-1] for s, _ in data.values())
    draw.text((10, 8), f"{Path(out).resolve().name}: loss terms per step ({steps} steps)", fill="black",
              font=_font(17))
    for i, (name, (xs, ys)) in enumerate(data.items()):
        draw_panel(draw, (i % COLUMNS) * PANEL_W, 34 + (i // COLUMNS) * PANEL_H, TITLES[name], xs, ys, fonts)
    path = Path(png) if png else Path(out) / PNG
    try:
        img.save(path)
    except OSError as e:
        raise AlignTIError(f"cannot write {path}: {e.strerror or e}") from None
    return path


def run_plot(cfg: PlotConfig) -> dict[str, Any]:
    """`alignti plot`: draw the picture, return where it is and what it shows."""
    path = plot_log(cfg.out, cfg.png)
    if path is None:
        raise AlignTIError(f"{Path(cfg.out) / LOG} holds no step yet")
    return {"png": str(path), "series": list(series(read_log(cfg.out)))}
