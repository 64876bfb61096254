"""Run every benchmark and write one JSON with every figure beside its target (bench/README.md).

    python bench/run_all.py [--skip-paper-table] [--skip-scale] [--demo-dir demo-out] [--out bench/results/all.json]

Runs cache_size, extract, distill, scale (unless skipped: ~15 min on 2 cores) and paper_table
(unless skipped: it trains 25 students) as subprocesses, reads their JSON, and prints one table:
figure, value, target, met.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from harness import figure, print_figures

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def run(script: str, *args: str) -> None:
    print(f"\n### {script} {' '.join(args)}", flush=True)
    subprocess.run([sys.executable, str(HERE / script), *args], check=True)


def figures(cache: dict, extract: dict, distill: dict, paper: dict | None = None,
            scale: dict | None = None) -> list[dict]:
    """Rows (`harness.figure`) from the benchmarks' JSON; paper_table's relative improvements are
    compared with the paper's own (+3.7% over SFT, +2.6% over KD); scale.py's rows come as it wrote them."""
    per = cache["bytes_per_response_token"]
    rows = [
        figure("cache bytes / response token, top-k (k=64)", per["topk"], "<=", 200.0),
        figure("cache bytes / response token, all signals", per["total"], "<=", 1536.0),
        figure("saliency probe forward / plain SDPA forward", extract["probe_forward_over_plain"], "<=", 1.05),
        figure("extract wall / bare teacher forwards", extract["extract_over_bare_forwards"], "<=", 1.15),
    ]
    for name, value in distill["ratios"].items():
        t = distill["targets"][name]
        rows.append(figure(f"distill: {name}", value, t["op"], t["value"]))
    for name, value in (paper or {}).get("relative", {}).items():
        rows.append(figure(f"paper table: {name}", value, ">=", paper["paper_relative"][name]))
    for signal, value in per.items():
        if signal not in ("topk", "total"):
            rows.append(figure(f"cache bytes / response token, {signal}", value))
    return rows + [{**row, "figure": f"scale: {row['figure']}"} for row in (scale or {}).get("figures", [])]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--skip-paper-table", action="store_true")
    ap.add_argument("--skip-scale", action="store_true", help="skip scale.py (real widths: ~15 min on 2 cores)")
    ap.add_argument("--demo-dir", default=None, help="reuse a finished demo's teacher and cache for paper_table")
    ap.add_argument("--out", default=str(RESULTS / "all.json"))
    args = ap.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    cache_json = subprocess.run([sys.executable, str(HERE / "cache_size.py"), "--json"], check=True,
                                capture_output=True, text=True).stdout.strip().splitlines()[-1]
    (RESULTS / "cache_size.json").write_text(cache_json)
    run("extract.py", "--out", str(RESULTS / "extract.json"))
    run("distill.py", "--out", str(RESULTS / "distill.json"))
    result = {"cache_size": json.loads(cache_json),
              "extract": json.loads((RESULTS / "extract.json").read_text()),
              "distill": json.loads((RESULTS / "distill.json").read_text())}
    if not args.skip_scale:
        run("scale.py", "--out", str(RESULTS / "scale.json"))
        result["scale"] = json.loads((RESULTS / "scale.json").read_text())
    if not args.skip_paper_table:
        run("paper_table.py", "--out", str(RESULTS / "paper_table.json"),
            *(["--demo-dir", args.demo_dir] if args.demo_dir else []))
        result["paper_table"] = json.loads((RESULTS / "paper_table.json").read_text())
    result["figures"] = figures(result["cache_size"], result["extract"], result["distill"], result.get("paper_table"),
                                result.get("scale"))
    print_figures(result["figures"], width=70)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
