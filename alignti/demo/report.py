"""The demo's report: report.json (machine-readable), report.md and the printed table."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from safetensors import safe_open

from alignti.data.shapes_render import POSITIONS


def count_params(model_dir: Path) -> int:
    """Parameters in a saved model directory (safetensors headers only; nothing is loaded)."""
    total = 0
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():
                shape = st.get_slice(name).get_shape()
                n = 1
                for d in shape:
                    n *= d
                total += n
    return total


def model_rows(models: dict[str, dict]) -> list[dict[str, Any]]:
    rows = []
    for name, m in models.items():
        s = m["scores"]
        rows.append({"name": name, "role": m["role"], "recipe": m["recipe"], "size": m["size"],
                     "params": count_params(m["path"]), "path": str(m["path"]),
                     "accuracy": {"overall": s["score"], **s["per_question_type"]},
                     **({"describe_token_f1": s["describe_token_f1"]} if "describe_token_f1" in s else {})})
    return rows


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """Accuracy per question type ("overall" leaves descriptions out; "describe" is their exact match),
    and descriptions' token F1 when the corpus has them."""
    types = [k for k in rows[0]["accuracy"] if k != "overall"]
    f1 = ["describe F1"] if "describe_token_f1" in rows[0] else []
    head = "| model | role | recipe | params | overall | " + " | ".join(types + f1) + " |"
    lines = [head, "|" + "---|" * (5 + len(types) + len(f1))]
    for r in rows:
        acc = r["accuracy"]
        cells = [r["name"], r["role"], r["recipe"], f"{r['params'] / 1e6:.2f}M", f"{acc['overall']:.1f}"]
        cells += [f"{acc[t]:.1f}" for t in types] + [f"{r['describe_token_f1']:.1f}" for _ in f1]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def position_note(rows: list[dict[str, Any]], n: int) -> str:
    """How the models do on position questions against chance: a guess among the four quadrants is
    right 25% of the time, and a score within two standard errors of that (over `n` questions) is
    chance. "" without position questions."""
    scores = {r["name"]: r["accuracy"]["position"] for r in rows if "position" in r["accuracy"]}
    if not scores or n <= 0:
        return ""
    chance = 100 / len(POSITIONS)
    margin = 2 * math.sqrt(chance * (100 - chance) / n)
    scale = (f"{chance:.0f}% for a guess among the four quadrants; within two standard errors over the {n} "
             f"held-out position questions, {margin:.1f} points, is chance")
    groups = {"above chance": [name for name, s in scores.items() if s > chance + margin],
              "at chance": [name for name, s in scores.items() if abs(s - chance) <= margin],
              "below chance": [name for name, s in scores.items() if s < chance - margin]}
    if len(groups["at chance"]) < len(scores):
        return f"Position questions ({scale}): " + "; ".join(
            f"{label} for {', '.join(names)}" for label, names in groups.items() if names) + "."
    return (f"Position questions are at chance for every model: {min(scores.values()):.1f}-{max(scores.values()):.1f}% "
            f"({scale}). The teacher does not tell where an object is (docs/results.md), so no recipe can distil "
            "it: compare the recipes on the other question types.")


def scope_note(work: Path, rows: list[dict[str, Any]], answer_style: str) -> str:
    """What one demo run can show and what it cannot (docs/results.md has the measurements behind it)."""
    teacher = next(r for r in rows if r["role"] == "teacher")["accuracy"]["overall"]
    students = [r["accuracy"]["overall"] for r in rows if r["role"] == "student"]
    shows = (f"What this run shows: every stage works end to end on this machine; the teacher learned the task "
             f"({teacher:.1f}% held-out, the students {min(students):.1f}-{max(students):.1f}%); its saliency sits on "
             "the asked-about object (below); one cache trains every student.")
    cannot = ("What it cannot show: it is one run with one seed, and it cannot rank the recipes: at these budgets "
              "another seed moves a student's score by as much as the gaps between recipes here, and no single "
              "term's effect (IVA's, TPA's) is visible in one run. `python bench/paper_table.py --demo-dir "
              f"{work}` distils each recipe over five seeds from this run's teacher and cache and reports per-seed "
              "paired differences; docs/results.md has its tables.")
    if answer_style == "short":
        cannot += (" With one-word answers TPA's candidate rows are mostly what follows a wrong answer (the "
                   "end-of-turn token), so this corpus cannot show TPA at all; `--answer-style reasoning` gives it "
                   "multi-token answers, at a higher cost.")
    else:
        cannot += (f" The answers are in the {answer_style} style, scored by their final answer (docs/eval.md); "
                   "descriptions by token F1.")
    return f"{shows}\n\n{cannot}"


def write_report(work: Path, models: dict[str, dict], cache: Path, teacher_fp: dict, extract: dict, irs: dict,
                 saliency: dict, setup: dict, timings: dict[str, float], quick: bool) -> dict[str, Any]:
    """Write report.json and report.md into `work`; print the table; return the report.

    irs: run_irs's result plus "plot" (irs.png's path). setup: {"vision_tower": {"steps", "accuracy"},
    "teacher_training": {"steps", "lr", "ground_weight", "ground_layer"}, "test_questions": {type: n},
    "answer_style": the corpus's}.
    """
    rows = model_rows(models)
    report = {
        "quick": quick,
        "answer_style": setup["answer_style"],
        "models": rows,
        "cache": {"path": str(cache.resolve()), "fingerprint": teacher_fp,
                  "bytes_per_response_token": extract["bytes_per_response_token"],
                  "bytes_per_response_token_by_signal": extract["bytes_per_response_token_by_signal"],
                  "samples": extract["cache_samples"], "response_tokens": extract["cache_response_tokens"],
                  "students_distilled_from_it": [r["name"] for r in rows if r["role"] == "student"]},
        "vision_tower": setup["vision_tower"],
        "teacher_training": setup["teacher_training"],
        "test_questions": setup["test_questions"],
        "irs": irs,
        "saliency": saliency,
        "timings": {**timings, "total": round(sum(timings.values()), 2)},
    }
    (work / "report.json").write_text(json.dumps(report, indent=2, default=str))
    table = markdown_table(rows)
    (work / "report.md").write_text("\n".join(report_markdown(work, report, table)) + "\n")
    print("\n" + table)
    print(f"\ncache: {report['cache']['path']}  ({report['cache']['bytes_per_response_token']:.0f} B/response token)")
    print(f"saliency on the object's tokens: {saliency['mean_mass_on_object_patches']:.3f} "
          f"(uniform {saliency['mean_object_patch_share']:.3f}); in its box {saliency['mean_mass_in_box']:.3f} vs box "
          f"share {saliency['mean_box_share']:.3f}; peak on the object {saliency['peak_in_box_rate']:.0%} "
          f"(random patch {saliency['peak_in_box_chance']:.0%})")
    print("one seed: the table cannot rank the recipes (bench/paper_table.py, docs/results.md)")
    print("seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in report["timings"].items()))
    print(f"report: {work / 'report.md'}")
    return report


def loss_plots(work: Path, rows: list[dict[str, Any]]) -> str:
    """One line linking each model's training-loss plot (distill writes loss.png beside final/)."""
    links = [f"[{r['name']}]({(Path(r['path']).parent / 'loss.png').relative_to(work)})" for r in rows
             if (Path(r["path"]).parent / "loss.png").is_file()]
    return "Training losses per step: " + ", ".join(links) + "." if links else ""


def report_markdown(work: Path, report: dict[str, Any], table: str) -> list[str]:
    """report.md's lines: the table, what to conclude from it, how the teacher and cache were made."""
    rows, cache, sal, irs = report["models"], report["cache"], report["saliency"], report["irs"]
    tower, teaching = report["vision_tower"], report["teacher_training"]
    teacher = next(r for r in rows if r["role"] == "teacher")
    position = position_note(rows, report["test_questions"].get("position", 0))
    return [
        "# alignti demo report", "",
        f"Held-out accuracy (%) on the shapes test split{' (quick mode)' if report['quick'] else ''}:", "", table, "",
        scope_note(work, rows, report["answer_style"]), "",
        *([position, ""] if position else []),
        f"Every student was distilled from the one cache `{cache['path']}` "
        f"(teacher weights {cache['fingerprint'].get('weights', '')[:12]}), "
        f"{cache['bytes_per_response_token']:.0f} bytes per response token.", "",
        f"Vision tower: pretrained for {tower['steps']} steps on the corpus's object annotations (per-patch "
        f"accuracy {tower['accuracy']}), then copied into the teacher and every student.",
        f"Teacher ({teacher['recipe']}): {teaching['steps']} SFT steps with the grounding term (weight "
        f"{teaching['ground_weight']}, layer {teaching['ground_layer']}: its instruction-to-vision attention trained "
        "toward the asked-about objects' boxes, so it looks where it is asked, as IVA presumes of a large pretrained "
        "teacher).",
        f"IVA layer (IRS): {irs['layer']}; IRS per layer: {', '.join(f'{x:.3g}' for x in irs['scores'])}.", "",
        f"![IRS per layer]({Path(irs['plot']).relative_to(work)})", "",
        f"Teacher saliency on the asked-about object ({sal['samples']} test images): "
        f"{sal['mean_mass_on_object_patches']:.3f} of the mass on the vision tokens the object's box "
        f"overlaps (uniform attention: {sal['mean_object_patch_share']:.3f}); "
        f"{sal['mean_mass_in_box']:.3f} inside the box itself, vs the box's {sal['mean_box_share']:.3f} "
        f"share of the image; its peak falls on the object in {sal['peak_in_box_rate']:.0%} of them "
        f"(a random patch would in {sal['peak_in_box_chance']:.0%}).", "",
        f"In the pictures each vision token is dimmed by its share of the saliency at layer {sal['layer']} (the "
        "number on it), the asked-about object's box is outlined, and above it are the question and its gold "
        "answer (the corpus's, not the teacher's reply).", "",
        loss_plots(work, rows), "",
        "Seconds per stage: " + ", ".join(f"{k} {v:.0f}" for k, v in report["timings"].items()), "",
        *[f"![saliency]({Path(p).relative_to(work)})" for p in sal["pictures"]],
    ]
