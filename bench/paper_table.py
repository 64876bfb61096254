"""The paper's central claim in miniature: SFT vs vanilla KD vs Align-TI (and KD+IVA, KD+TPA).

    python bench/paper_table.py [--demo-dir demo-out] [--seeds 0 1 2 3 4] [--steps 2500] [--size student-s]
                                [--recipes sft alignti] [--iva-target attention] [--iva-weight 1]

Every student comes from the same teacher, the same cache, the same data, the same number of
steps and, for a given seed, the same initialisation; only the objective differs. With
--demo-dir, the teacher and cache of a finished `alignti demo` run are reused; otherwise a demo
teacher and cache are built first (`alignti demo`'s default plan). Reports mean and spread of
held-out accuracy over the seeds and the relative improvement of Align-TI over SFT and KD (the
paper reports +3.7% over SFT and +2.6% over vanilla KD on its benchmarks).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from alignti.demo.parallel import run_many
from alignti.demo.run import DEFAULT, DemoConfig, run_demo, train_config
from alignti.demo.tower import copy_tower
from alignti.eval.run import EvalConfig, run_eval
from alignti.models.assemble import AssembleConfig, run_assemble
from alignti.models.loading import load_model

# name -> (sft, kd, iva, tpa) weights
RECIPES = {
    "sft": (1, 0, 0, 0),
    "kd": (1, 1, 0, 0),
    "kd+iva": (1, 1, 1, 0),
    "kd+tpa": (1, 1, 0, 1),
    "alignti": (1, 1, 1, 1),
}


def run_config(work: Path, demo: Path, size: str, recipe: str, seed: int, steps: int,
               iva_target: str = "logits", iva_weight: float = 1.0):
    """The distill config of one (recipe, seed) run; its initialisation depends on the seed only.
    iva_target / iva_weight: how the recipes that have the IVA term use it."""
    init = work / "init" / f"{size}-seed{seed}"
    if not (init / "config.json").exists():  # a fresh LM per seed, with the demo's pretrained vision tower
        run_assemble(AssembleConfig(out=str(init), random=True, seed=seed + 1,
                                    tokenizer_from=str(demo / "init" / "teacher"), **DEFAULT.students[size]))
        copy_tower(load_model(demo / "init" / "teacher"), [init])
    sft, kd, iva, tpa = RECIPES[recipe]
    return train_config(init, work / "runs" / f"{size}-{recipe}-seed{seed}", DEFAULT, steps, DEFAULT.student_lr, seed,
                        cache=str(demo / "cache"), recipe="alignti", sft_weight=float(sft), kd_weight=float(kd),
                        iva_weight=float(iva) * iva_weight, tpa_weight=float(tpa), iva_target=iva_target,
                        train="full", overwrite=True)


def evaluate(work: Path, demo: Path, final: str) -> float:
    shapes = demo / "shapes"
    scores = run_eval(EvalConfig(out=str(work / "eval" / Path(final).parent.name), benchmark="shapes",
                                 questions=str(shapes / "test.json"), image_root=str(shapes), model=final,
                                 batch_size=32))
    return float(scores["score"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--demo-dir", default=None, help="reuse this finished demo's teacher and cache")
    ap.add_argument("--work", default="bench/results/paper_table")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4],
                    help="five by default: three seeds gave a misleading gap in docs/results.md")
    ap.add_argument("--steps", type=int, default=2500,
                    help="student steps; at 1,000 the recipes are not separable (docs/results.md)")
    ap.add_argument("--size", default="student-s", choices=sorted(DEFAULT.students))
    ap.add_argument("--out", default="bench/results/paper_table.json")
    ap.add_argument("--jobs", type=int, default=2, help="distillations at once (one single-threaded process each)")
    ap.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    ap.add_argument("--iva-target", default="logits", choices=["logits", "attention"],
                    help="IVA on the teacher's vision-row distributions (default) or on its saliency")
    ap.add_argument("--iva-weight", type=float, default=1.0, help="IVA weight in the recipes that have it")
    args = ap.parse_args()
    work = Path(args.work)
    demo = Path(args.demo_dir) if args.demo_dir else work / "demo"
    if not args.demo_dir:
        run_demo(DemoConfig(workdir=str(demo)))
    t0 = time.time()
    acc: dict[str, list[float]] = {r: [] for r in args.recipes}
    runs = [(seed, recipe) for seed in args.seeds for recipe in args.recipes]
    configs = [run_config(work, demo, args.size, recipe, seed, args.steps, args.iva_target, args.iva_weight)
               for seed, recipe in runs]
    summaries = run_many(configs, [f"{recipe} seed {seed}" for seed, recipe in runs], args.jobs)
    for (seed, recipe), summary in zip(runs, summaries):
        acc[recipe].append(evaluate(work, demo, summary["final"]))
        print(f"seed {seed} {recipe}: {acc[recipe][-1]:.2f}", flush=True)
    table = {r: {"mean": statistics.mean(v), "stdev": statistics.stdev(v) if len(v) > 1 else 0.0, "runs": v}
             for r, v in acc.items()}
    rel = {f"alignti_vs_{b}_percent": 100 * (table["alignti"]["mean"] / table[b]["mean"] - 1)
           for b in ("sft", "kd") if "alignti" in table and b in table and table[b]["mean"] > 0}
    result = {"size": args.size, "steps": args.steps, "seeds": args.seeds, "iva_target": args.iva_target,
              "iva_weight": args.iva_weight, "table": table, "relative": rel,
              "paper_relative": {"alignti_vs_sft_percent": 3.7, "alignti_vs_kd_percent": 2.6},
              "seconds": round(time.time() - t0, 1), "demo_dir": str(demo)}
    print(f"\n{'recipe':<10}{'mean acc':>10}{'stdev':>8}   runs")
    for r, row in table.items():
        print(f"{r:<10}{row['mean']:>10.2f}{row['stdev']:>8.2f}   " + " ".join(f"{x:.1f}" for x in row["runs"]))
    for k, v in rel.items():
        print(f"{k}: {v:+.2f}%")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
