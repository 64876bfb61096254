"""The demo's report: report.json (machine-readable), report.md and the printed table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors import safe_open


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
                     "accuracy": {"overall": s["score"], **s["per_question_type"]}})
    return rows


def markdown_table(rows: list[dict[str, Any]]) -> str:
    types = [k for k in rows[0]["accuracy"] if k != "overall"]
    head = "| model | role | recipe | params | overall | " + " | ".join(types) + " |"
    lines = [head, "|" + "---|" * (5 + len(types))]
    for r in rows:
        acc = r["accuracy"]
        cells = [r["name"], r["role"], r["recipe"], f"{r['params'] / 1e6:.2f}M", f"{acc['overall']:.1f}"]
        lines.append("| " + " | ".join(cells + [f"{acc[t]:.1f}" for t in types]) + " |")
    return "\n".join(lines)


def write_report(work: Path, models: dict[str, dict], cache: Path, teacher_fp: dict, extract: dict, irs: dict,
                 saliency: dict, setup: dict, timings: dict[str, float], quick: bool) -> dict[str, Any]:
    """Write report.json and report.md into `work`; print the table; return the report.

    setup: {"vision_tower": {"steps", "accuracy"}, "teacher_training": {"steps", "lr", "ground_weight",
    "ground_layer"}}.
    """
    rows = model_rows(models)
    tower, teaching = setup["vision_tower"], setup["teacher_training"]
    report = {
        "quick": quick,
        "models": rows,
        "cache": {"path": str(cache.resolve()), "fingerprint": teacher_fp,
                  "bytes_per_response_token": extract["bytes_per_response_token"],
                  "bytes_per_response_token_by_signal": extract["bytes_per_response_token_by_signal"],
                  "samples": extract["cache_samples"], "response_tokens": extract["cache_response_tokens"],
                  "students_distilled_from_it": [r["name"] for r in rows if r["role"] == "student"]},
        "vision_tower": tower,
        "teacher_training": teaching,
        "irs": irs,
        "saliency": saliency,
        "timings": {**timings, "total": round(sum(timings.values()), 2)},
    }
    (work / "report.json").write_text(json.dumps(report, indent=2, default=str))
    table = markdown_table(rows)
    md = [
        "# alignti demo report", "",
        f"Held-out accuracy (%) on the shapes test split{' (quick mode)' if quick else ''}:", "", table, "",
        f"Every student was distilled from the one cache `{report['cache']['path']}` "
        f"(teacher weights {teacher_fp.get('weights', '')[:12]}), "
        f"{report['cache']['bytes_per_response_token']:.0f} bytes per response token.", "",
        f"Vision tower: pretrained for {tower['steps']} steps on the corpus's object annotations (per-patch "
        f"accuracy {tower['accuracy']}), then copied into the teacher and every student.",
        f"Teacher: {teaching['steps']} SFT steps with the grounding term (weight {teaching['ground_weight']}, "
        f"layer {teaching['ground_layer']}: its instruction-to-vision attention trained toward the asked-about "
        f"objects' boxes, so it looks where it is asked, as IVA presumes of a large pretrained teacher).",
        f"IVA layer (IRS): {irs['layer']} with scores {irs['scores']}.",
        f"Teacher saliency on the asked-about object ({saliency['samples']} test images): "
        f"{saliency['mean_mass_on_object_patches']:.3f} of the mass on the vision tokens the object's box "
        f"overlaps (uniform attention: {saliency['mean_object_patch_share']:.3f}); "
        f"{saliency['mean_mass_in_box']:.3f} inside the box itself, vs the box's {saliency['mean_box_share']:.3f} "
        f"share of the image; its peak falls on the object in {saliency['peak_in_box_rate']:.0%} of them "
        f"(a random patch would in {saliency['peak_in_box_chance']:.0%}).", "",
        "Seconds per stage: " + ", ".join(f"{k} {v:.0f}" for k, v in report["timings"].items()), "",
        *[f"![saliency]({Path(p).relative_to(work)})" for p in saliency["pictures"]],
    ]
    (work / "report.md").write_text("\n".join(md) + "\n")
    print("\n" + table)
    print(f"\ncache: {report['cache']['path']}  ({report['cache']['bytes_per_response_token']:.0f} B/response token)")
    print(f"saliency on the object's tokens: {saliency['mean_mass_on_object_patches']:.3f} "
          f"(uniform {saliency['mean_object_patch_share']:.3f}); in its box {saliency['mean_mass_in_box']:.3f} vs box "
          f"share {saliency['mean_box_share']:.3f}; peak on the object {saliency['peak_in_box_rate']:.0%} "
          f"(random patch {saliency['peak_in_box_chance']:.0%})")
    print("seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in report["timings"].items()))
    print(f"report: {work / 'report.md'}")
    return report
