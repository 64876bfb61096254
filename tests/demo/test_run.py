"""`alignti demo` end to end on a micro plan: every stage runs and report.json holds what the
issue asks for (the real plans' accuracy is measured by running the demo, not in CI)."""

import json
from pathlib import Path

import pytest

from alignti.demo import run as demo
from alignti.demo.report import markdown_table, position_note, scope_note
from alignti.errors import AlignTIError

_V = dict(vision_hidden=32, vision_layers=1, image_size=32, patch=16, vocab_size=320)
MICRO = demo.DemoPlan(
    n=60, teacher=dict(hidden=64, layers=2, heads=4, kv_heads=2, **_V),
    students={"student-s": dict(hidden=32, layers=1, heads=2, kv_heads=1, **_V),
              "student-m": dict(hidden=48, layers=2, heads=4, kv_heads=2, **_V)},
    tower_steps=20, teacher_steps=12, teacher_lr=1e-3, ground_weight=0.3,
    student_steps=4, student_lr=1e-3, batch_size=8,
    irs_samples=8, pictures=2)


def test_demo_micro_run_writes_the_report(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(demo, "QUICK", MICRO)
    work = tmp_path / "demo"
    report = demo.run_demo(demo.DemoConfig(workdir=str(work), quick=True, jobs=2))
    on_disk = json.loads((work / "report.json").read_text())
    assert on_disk["cache"] == json.loads(json.dumps(report["cache"], default=str))
    models = on_disk["models"]
    assert [m["name"] for m in models] == ["teacher"] + [f"{s}-{r}" for s in MICRO.students for r in demo.RECIPES]
    types = {"color", "shape", "position", "count", "existence"}
    assert models[0]["role"] == "teacher" and models[0]["recipe"] == "sft + grounding"
    for m in models:
        assert m["role"] in ("teacher", "student") and m["params"] > 0
        assert m["recipe"] in demo.RECIPES or m["role"] == "teacher"
        assert set(m["accuracy"]) == types | {"overall"}
    cache = on_disk["cache"]
    assert Path(cache["path"]) == (work / "cache").resolve() and cache["fingerprint"]["weights"]
    assert cache["bytes_per_response_token"] > 0 and len(cache["students_distilled_from_it"]) == 6
    for m in models[1:]:  # every student's training config names that one cache
        run = json.loads((work / "students" / m["name"] / "distill.json").read_text())
        assert Path(run["config"]["cache"]).resolve() == Path(cache["path"])
    assert set(on_disk["timings"]) >= {"corpus", "vision_tower", "teacher_sft", "irs", "extract", "distill", "eval"}
    assert on_disk["vision_tower"]["steps"] == 20 and set(on_disk["vision_tower"]["accuracy"]) == {"color", "shape"}
    assert on_disk["teacher_training"] == {"steps": 12, "lr": 1e-3, "ground_weight": 0.3, "ground_layer": 1}
    teacher_log = [json.loads(line) for line in (work / "teacher" / "log.jsonl").read_text().splitlines()]
    assert all("ground" in r for r in teacher_log)  # the grounding term trained the teacher
    assert 0 <= on_disk["saliency"]["peak_in_box_rate"] <= 1 and 0 < on_disk["saliency"]["peak_in_box_chance"] < 1
    sal = on_disk["saliency"]
    assert sal["mean_mass_in_box"] <= sal["mean_mass_on_object_patches"] <= 1 and 0 < sal["mean_object_patch_share"] < 1
    assert len(on_disk["saliency"]["pictures"]) == 2 and all(Path(p).is_file() for p in on_disk["saliency"]["pictures"])
    md = (work / "report.md").read_text()
    assert md.count("![saliency]") == 2 and "gold answer" in md
    assert "![IRS per layer](irs.png)" in md and (work / "irs.png").is_file()
    assert "cannot rank the recipes" in md and "bench/paper_table.py" in md and "docs/results.md" in md
    assert "Position questions" in md and on_disk["test_questions"]["position"] >= 1
    assert "| teacher | teacher | sft + grounding |" in md and "Teacher (sft + grounding)" in md
    for m in models:  # each model's loss plot is linked, and exists
        link = f"[{m['name']}]({Path(m['path']).parent.relative_to(work) / 'loss.png'})"
        assert link in md and (work / Path(m["path"]).parent.relative_to(work) / "loss.png").is_file(), link
    out = capsys.readouterr().out
    layer = on_disk["irs"]["layer"]
    assert f"IVA layer l* = {layer}, IRS {on_disk['irs']['scores'][layer]:.3f}" in out
    for m in models[1:]:  # each eval table names its model
        assert f"shapes (llava scoring), model {m['name']}_final" in out


def test_demo_refuses_a_foreign_workdir(tmp_path):
    (tmp_path / "mine.txt").write_text("keep me")
    with pytest.raises(AlignTIError, match="not a demo workdir"):
        demo.prepare_workdir(str(tmp_path))
    with pytest.raises(AlignTIError, match="--jobs"):
        demo.DemoConfig(jobs=0)
    with pytest.raises(AlignTIError, match="--answer-style must be one of short, sentence, reasoning, mixed"):
        demo.DemoConfig(answer_style="essay")


def test_report_says_what_one_run_shows_and_scores_descriptions():
    rows = [{"name": "teacher", "role": "teacher", "recipe": "sft + grounding", "params": 1e6,
             "accuracy": {"overall": 89.2, "color": 99.0, "describe": 58.0}, "describe_token_f1": 84.5},
            {"name": "student-s-kd", "role": "student", "recipe": "kd", "params": 4e5,
             "accuracy": {"overall": 46.6, "color": 63.0, "describe": 14.0}, "describe_token_f1": 61.25}]
    table = markdown_table(rows)
    assert "| overall | color | describe | describe F1 |" in table and "| 58.0 | 84.5 |" in table.splitlines()[2]
    long = scope_note(Path("w"), rows, "reasoning")
    assert "89.2% held-out, the students 46.6-46.6%" in long and "cannot rank the recipes" in long
    assert "reasoning style, scored by their final answer" in long and "end-of-turn" not in long
    short = scope_note(Path("w"), rows, "short")
    assert "cannot show TPA at all" in short and "--answer-style reasoning" in short


def test_position_note_calls_chance_within_two_standard_errors():
    rows = [{"name": "teacher", "accuracy": {"position": 26.0}},
            {"name": "student-s-sft", "accuracy": {"position": 33.0}}]
    note = position_note(rows, 100)  # two standard errors of 25% over 100 questions: 8.7 points
    assert note.startswith("Position questions are at chance for every model: 26.0-33.0%") and "8.7 points" in note
    rows[1]["accuracy"]["position"] = 34.0
    assert position_note(rows, 100).endswith("is chance): above chance for student-s-sft; at chance for teacher.")
    rows[0]["accuracy"]["position"] = 16.0
    assert position_note(rows, 100).endswith("above chance for student-s-sft; below chance for teacher.")
    assert position_note(rows, 0) == ""
