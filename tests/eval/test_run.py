"""`alignti eval` end to end on a tiny model: every benchmark's real file format, resume after an
interruption, scoring without a model, and the --report table."""

import base64
import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

import alignti.eval.generate as generate_mod
import alignti.eval.run as run_mod
from alignti.cliargs import build, read_run_file
from alignti.errors import AlignTIError
from alignti.eval.formats import BENCHMARKS, SHORT_ANSWER
from alignti.eval.questions import load_questions
from alignti.eval.run import EvalConfig, run_eval

ANSWER_FIELDS = {"question_id", "prompt", "text", "model_id", "benchmark"}


def _png(path, color):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (12, 10), color).save(path)


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _gqa(d):
    for i in (1, 2, 3):
        _png(d / "images" / f"n{i}.jpg", (40 * i, 0, 0))
    (d / "data").mkdir()
    gold = {f"20{i}": {"answer": a, "types": {"structural": "query", "semantic": "attr"}}
            for i, a in ((1, "yes"), (2, "table"), (3, "left"))}
    (d / "data" / "testdev_balanced_questions.json").write_text(json.dumps(gold))
    _jsonl(d / "llava_gqa_testdev_balanced.jsonl", [
        {"question_id": f"20{i}", "image": f"n{i}.jpg", "text": f"Question {i}?\n{SHORT_ANSWER}"} for i in (1, 2, 3)])
    return d / "llava_gqa_testdev_balanced.jsonl", d / "images"


def _textvqa(d):
    for name in ("aaa", "bbb"):
        _png(d / "train_images" / f"{name}.jpg", (0, 90, 0))
    data = [{"image_id": "aaa", "question_id": 1, "question": "what brand is this?", "answers": ["nokia"] * 10},
            {"image_id": "aaa", "question_id": 2, "question": "how many people?", "answers": ["2"] * 10},
            {"image_id": "bbb", "question_id": 3, "question": "what is written?", "answers": ["stop"] * 10}]
    (d / "TextVQA_0.5.1_val.json").write_text(json.dumps({"data": data}))
    _jsonl(d / "llava_textvqa_val_v051_ocr.jsonl", [  # the image id repeats: told apart by the question
        {"question_id": a["image_id"], "image": f"{a['image_id']}.jpg",
         "text": f"{a['question'].capitalize()}\nReference OCR token: x\n{SHORT_ANSWER}"} for a in data])
    return d / "llava_textvqa_val_v051_ocr.jsonl", d / "train_images"


def _pope(d):
    cases = [("random", "i1.jpg", "dog", "yes"), ("random", "i1.jpg", "cat", "no"),
             ("adversarial", "i2.jpg", "cup", "no")]
    (d / "coco").mkdir()
    for split in ("random", "adversarial"):
        _jsonl(d / "coco" / f"coco_pope_{split}.json", [
            {"image": img, "text": f"Is there a {o} in the image?", "label": lab}
            for s, img, o, lab in cases if s == split])
    for img in ("i1.jpg", "i2.jpg"):
        _png(d / "val2014" / img, (0, 0, 200))
    _jsonl(d / "llava_pope_test.jsonl", [
        {"question_id": k, "image": img, "category": s, "text": f"Is there a {o} in the image?\n{SHORT_ANSWER}"}
        for k, (s, img, o, _) in enumerate(cases)])
    return d / "llava_pope_test.jsonl", d / "val2014"


def _mme(d):
    root = d / "MME_Benchmark_release_version"
    yn = "Please answer yes or no."
    cases = [("existence", "0001", "Is there a dog in this image?", "Yes"),
             ("existence", "0001", "Is there a cat in this image?", "No"),
             ("artwork", "10002", "Is this artwork created by Monet?", "Yes")]
    for cat, stem, q, gold in cases:
        flat = cat != "artwork"  # artwork keeps images/ and questions_answers_YN/
        _png(root / cat / ("" if flat else "images") / f"{stem}.png", (200, 200, 0))
        qa = root / cat / ("" if flat else "questions_answers_YN")
        qa.mkdir(parents=True, exist_ok=True)
        with (qa / f"{stem}.txt").open("a") as f:
            f.write(f"{q} {yn}\t{gold}\n")
    rel = {"existence": "existence/0001.png", "artwork": "artwork/images/10002.png"}
    _jsonl(d / "llava_mme.jsonl", [{"question_id": rel[c], "image": rel[c], "category": c,
                                     "text": f"{q} {yn}\n{SHORT_ANSWER}"} for c, _, q, _ in cases])
    return d / "llava_mme.jsonl", root


def _scienceqa(d):
    problems = {"1": (["cat", "dog"], 1, True), "2": (["yes", "no", "maybe"], 0, False), "3": (["x", "y"], 0, True)}
    (d / "problems.json").write_text(json.dumps({pid: {"choices": c, "answer": a, "subject": "natural science"}
                                                 for pid, (c, a, _) in problems.items()}))
    (d / "pid_splits.json").write_text(json.dumps({"test": list(problems)}))
    records = []
    for pid, (choices, _, img) in problems.items():
        opts = "\n".join(f"{'ABCDE'[i]}. {c}" for i, c in enumerate(choices))
        human = ("<image>\n" if img else "") + f"Q{pid}?\n{opts}"
        rec = {"id": pid, "conversations": [{"from": "human", "value": human}, {"from": "gpt", "value": "A"}]}
        if img:  # question 2 is text-only: a batch mixes image and text-only questions
            rec["image"] = f"{pid}/image.png"
            _png(d / "images" / "test" / pid / "image.png", (0, 120, 120))
        records.append(rec)
    (d / "llava_test_CQM-A.json").write_text(json.dumps(records))
    return d / "llava_test_CQM-A.json", d / "images" / "test"


def _mmbench(d, with_answer=True):
    buf = io.BytesIO()
    Image.new("RGB", (12, 10), (250, 0, 250)).save(buf, format="PNG")
    b64 = base64.b64encode(buf.getvalue()).decode()
    rows = [(0, ["cat", "dog", "bird", "fish"], "B", b64), (1000000, ["dog", "bird", "fish", "cat"], "A", "0"),
            (1, ["red", "green", "nan", "nan"], "A", b64)]
    path = d / "mmbench_dev_20230712.tsv"
    with path.open("w", newline="") as f:
        w = csv.writer(f, delimiter="\t")
        w.writerow(["index", "question", "hint", "A", "B", "C", "D"] + ["answer"] * with_answer +
                   ["category", "source", "l2-category", "comment", "split", "image"])
        for idx, opts, ans, img in rows:
            w.writerow([idx, f"Question {idx % 1000000}?", "nan", *opts] + [ans] * with_answer +
                       ["attr", "s", "l2", "nan", "dev", img])
    return path, None


def _shapes(d):
    from alignti.data.shapes import ShapesConfig, run_shapes

    run_shapes(ShapesConfig(out=str(d / "shapes"), n=10, seed=0, image_size=32, test_fraction=0.3))
    return d / "shapes" / "test.json", d / "shapes"


FIXTURES = {"gqa": _gqa, "textvqa": _textvqa, "pope": _pope, "mme": _mme, "scienceqa": _scienceqa,
            "mmbench": _mmbench, "shapes": _shapes}


def _cfg(tmp_path, bench, model=None, **kw):
    qfile, root = FIXTURES[bench](tmp_path)
    kw = {"batch_size": 2, "max_new_tokens": 3, **kw}
    return EvalConfig(out=str(tmp_path / "out"), benchmark=bench, questions=str(qfile),
                      image_root=str(root) if root else None, model=str(model) if model else None, **kw)


def _records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_every_benchmark_has_a_fixture():
    assert set(FIXTURES) == set(BENCHMARKS)


@pytest.mark.parametrize("bench", BENCHMARKS)
def test_generation_end_to_end(tmp_path, tiny_model_dir, bench, capsys):
    cfg = _cfg(tmp_path, bench, tiny_model_dir)
    questions = load_questions(bench, cfg.questions, image_root=cfg.image_root)
    res = run_eval(cfg)
    records = _records(tmp_path / "out" / "answers.jsonl")
    assert len(records) == len(questions) >= 3
    assert all(set(r) == ANSWER_FIELDS and isinstance(r["text"], str) for r in records)
    assert [(r["question_id"], r["prompt"]) for r in records] == [(q.question_id, q.prompt) for q in questions]
    assert {(r["model_id"], r["benchmark"]) for r in records} == {(tiny_model_dir.name, bench)}
    assert res["n_answered"] == len(questions) and res["missing"] == 0 and res["generated"] == len(questions)
    saved = json.loads((tmp_path / "out" / "scores.json").read_text())
    assert saved["score"] == res["score"] and saved["benchmark"] == bench and saved["model_id"] == tiny_model_dir.name
    assert f"{bench} (llava scoring)" in capsys.readouterr().out


class Killed(Exception):
    pass


def _counting_generator(monkeypatch, fail_on_call=None):
    """Wrap generate_batch: record each call's question keys; raise on call number `fail_on_call`."""
    calls, real = [], generate_mod.generate_batch

    def wrapped(gen, questions, image_root):
        calls.append([q.key for q in questions])
        if len(calls) == fail_on_call:
            raise Killed  # as if the run were killed between batches
        return real(gen, questions, image_root)

    monkeypatch.setattr(generate_mod, "generate_batch", wrapped)
    return calls


def test_interrupted_eval_resumes_without_reanswering(tmp_path, tiny_model_dir, monkeypatch):
    cfg = _cfg(tmp_path, "scienceqa", tiny_model_dir, batch_size=1)  # 3 questions, one per batch
    keys = [q.key for q in load_questions("scienceqa", cfg.questions)]
    calls = _counting_generator(monkeypatch, fail_on_call=2)
    with pytest.raises(Killed):
        run_eval(cfg)
    answers = tmp_path / "out" / "answers.jsonl"
    first = answers.read_text()
    assert len(_records(answers)) == 1 and not (tmp_path / "out" / "scores.json").exists()
    monkeypatch.undo()
    calls = _counting_generator(monkeypatch)
    res = run_eval(cfg)
    assert calls == [[keys[1]], [keys[2]]]  # only the unanswered questions
    assert answers.read_text().startswith(first)  # the first record is untouched
    assert [r["question_id"] for r in _records(answers)] == keys and res["duplicate_answers"] == 0
    # The same texts as an uninterrupted run.
    monkeypatch.undo()
    full = run_eval(EvalConfig(**{**cfg.__dict__, "out": str(tmp_path / "full")}))
    assert (tmp_path / "full" / "answers.jsonl").read_text() == answers.read_text()
    assert full["score"] == res["score"]
    calls = _counting_generator(monkeypatch)
    run_eval(cfg)  # everything answered: nothing generated (the model is not even loaded)
    assert calls == []


def test_limit_then_full_run_and_a_cut_last_line(tmp_path, tiny_model_dir, monkeypatch):
    cfg = _cfg(tmp_path, "pope", tiny_model_dir, limit=2)
    res = run_eval(cfg)
    assert res["n_questions"] == 2 and res["limit"] == 2
    answers = tmp_path / "out" / "answers.jsonl"
    with answers.open("a") as f:
        f.write('{"question_id": 2, "prompt": "Is there a cu')  # a killed writer's half line
    calls = _counting_generator(monkeypatch)
    res = run_eval(EvalConfig(**{**cfg.__dict__, "limit": None}))
    assert calls == [["2"]]
    assert [r["question_id"] for r in _records(answers)] == [0, 1, 2] and res["n_answered"] == 3


def test_mmbench_test_split_is_answered_not_scored(tmp_path, tiny_model_dir):
    qfile, _ = _mmbench(tmp_path, with_answer=False)  # the test TSV has no answer column
    res = run_eval(EvalConfig(out=str(tmp_path / "out"), benchmark="mmbench", questions=str(qfile),
                              model=str(tiny_model_dir), max_new_tokens=2))
    assert res["scored"] is False and res["generated"] == 3
    assert len(_records(tmp_path / "out" / "answers.jsonl")) == 3 and not (tmp_path / "out" / "scores.json").exists()
    with pytest.raises(AlignTIError, match="no 'answer' column"):  # scoring it alone is an error
        run_eval(EvalConfig(out=str(tmp_path / "out"), benchmark="mmbench", questions=str(qfile)))


def test_scoring_only_needs_no_model(tmp_path, monkeypatch):
    def no_model(*a, **k):
        raise AssertionError("scoring must not load a model")

    monkeypatch.setattr(run_mod, "load_model", no_model)
    qfile, _ = _gqa(tmp_path)
    answers = tmp_path / "llava_answers.jsonl"  # LLaVA-style records: extra fields, no benchmark
    _jsonl(answers, [{"question_id": "201", "prompt": "p", "text": "Yes.", "answer_id": "x", "model_id": "llava",
                      "metadata": {}},
                     {"question_id": "202", "prompt": "p", "text": "The table", "model_id": "llava"},
                     {"question_id": "203", "prompt": "p", "text": "left", "model_id": "llava"}])
    cfg = EvalConfig(out=str(tmp_path / "out"), benchmark="gqa", questions=str(qfile), answers=str(answers))
    res = run_eval(cfg)
    assert build(EvalConfig, read_run_file(tmp_path / "out" / "eval.yaml")) == cfg  # the run's options
    # "yes." -> "yes" right; "the table" != "table"; "left" right -> 2 of 3
    assert res["score"] == pytest.approx(200 / 3) and res["model_id"] == "llava" and res["generated"] == 0
    res = run_eval(EvalConfig(out=str(tmp_path / "out2"), benchmark="gqa", questions=str(qfile),
                              answers=str(answers), scoring="lmms-eval"))
    assert res["score"] == pytest.approx(200 / 3) and res["scoring"] == "lmms-eval"


@pytest.mark.parametrize("records", [
    [],                                                                    # empty
    [{"question_id": "n1.jpg", "text": "yes"}, {"question_id": 7, "text": "no"}],  # another id scheme
    [{"question_id": "201", "text": "yes", "benchmark": "pope"}],         # another benchmark's answers
])
def test_answers_matching_no_question_are_refused(tmp_path, records):
    qfile, _ = _gqa(tmp_path)
    answers = tmp_path / "answers.jsonl"
    _jsonl(answers, records)
    with pytest.raises(AlignTIError, match="answers file .*(holds no answers|matches none of the 3 questions|"
                                           "holds 'pope' answers)"):
        run_eval(EvalConfig(out=str(tmp_path / "out"), benchmark="gqa", questions=str(qfile), answers=str(answers)))
    assert not (tmp_path / "out").exists()  # nothing written


def test_score_only_errors_are_one_line_exit_2(tmp_path):
    qfile, _ = _gqa(tmp_path)
    answers = tmp_path / "answers.jsonl"
    answers.write_bytes(b'{"question_id": "201", "text": "\xff"}\n')  # not UTF-8
    res = subprocess.run([sys.executable, "-c", "from alignti.cli import main; main()", "eval", "--benchmark", "gqa",
                          "--questions", str(qfile), "--answers", str(answers), "--out", str(tmp_path / "out")],
                         capture_output=True, text=True)
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "is not UTF-8 text" in res.stderr, res.stderr
    assert not (tmp_path / "out").exists()


def test_config_errors(tmp_path, tiny_model_dir):
    qfile, _ = _gqa(tmp_path)
    with pytest.raises(AlignTIError, match="no --model and no answers file"):
        EvalConfig(out=str(tmp_path / "out"), benchmark="gqa", questions=str(qfile))
    with pytest.raises(AlignTIError, match="--benchmark and --questions are required"):
        EvalConfig(out=str(tmp_path / "out"), model=str(tiny_model_dir))
    with pytest.raises(AlignTIError, match="must be >= 1"):
        EvalConfig(out="o", benchmark="gqa", questions=str(qfile), model="m", batch_size=0)
    with pytest.raises(AlignTIError, match="--image-root .*nope. does not exist"):
        EvalConfig(out="o", benchmark="gqa", questions=str(qfile), model="m", image_root=str(tmp_path / "nope"))
    EvalConfig(out="o", report=True, dirs=["a", "b"])  # --report ignores the rest
    # Questions with images and no --image-root: stopped before any model is loaded.
    with pytest.raises(AlignTIError, match="pass --image-root"):
        run_eval(EvalConfig(out=str(tmp_path / "out"), benchmark="gqa", questions=str(qfile), model="missing-dir"))


def test_resuming_another_models_answers_is_refused(tmp_path, tiny_model_dir):
    cfg = _cfg(tmp_path, "gqa", tiny_model_dir)
    (tmp_path / "out").mkdir()
    _jsonl(tmp_path / "out" / "answers.jsonl", [{"question_id": "201", "text": "yes", "model_id": "other-model"}])
    with pytest.raises(AlignTIError, match="answers of model 'other-model'"):
        run_eval(cfg)


def _scores_dir(tmp_path, name, bench, texts, scoring="llava", limit=None):
    fixture_dir = tmp_path / f"{name}-{bench}-{scoring}"
    fixture_dir.mkdir()
    qfile, _ = FIXTURES[bench](fixture_dir)
    questions = load_questions(bench, qfile)
    answers = tmp_path / f"{name}-{bench}-{scoring}.jsonl"
    _jsonl(answers, [{"question_id": q.question_id, "prompt": q.prompt, "text": t, "model_id": name}
                     for q, t in zip(questions, texts)])
    out = tmp_path / "scores" / f"{name}-{bench}-{scoring}"
    run_eval(EvalConfig(out=str(out), benchmark=bench, questions=str(qfile), answers=str(answers), scoring=scoring,
                        limit=limit))
    return out


def test_report_over_score_dirs(tmp_path, capsys):
    dirs = [
        _scores_dir(tmp_path, "student", "gqa", ["yes", "table", "right"]),      # 2 of 3
        _scores_dir(tmp_path, "teacher", "gqa", ["Yes", "table", "left"]),       # 3 of 3
        _scores_dir(tmp_path, "teacher", "gqa", ["yes", "no"], "lmms-eval"),     # 1 of 3 (one unanswered)
        _scores_dir(tmp_path, "student", "pope", ["yes", "no", "no"], limit=2),  # 2 of 2, limited
    ]
    cfg = EvalConfig(out=str(tmp_path / "cmp"), report=True, dirs=[str(d) for d in dirs])
    report = run_eval(cfg)
    assert build(EvalConfig, read_run_file(tmp_path / "cmp" / "eval.yaml")) == cfg
    assert report["columns"] == ["GQA", "GQA (lmms-eval)", "POPE"]
    assert report["models"] == ["student", "teacher"]
    assert report["table"]["student"] == pytest.approx({"GQA": 200 / 3, "POPE": 100.0})
    assert report["table"]["teacher"] == pytest.approx({"GQA": 100.0, "GQA (lmms-eval)": 100 / 3})
    md = (tmp_path / "cmp" / "report.md").read_text()
    assert "| model | GQA | GQA (lmms-eval) | POPE |" in md
    assert "| student | 66.67 | - | 100.00* |" in md and "| teacher | 100.00 | 33.33* | - |" in md
    assert "first 2 questions only" in md and "1 of 3 questions unanswered" in md
    assert json.loads((tmp_path / "cmp" / "report.json").read_text()) == json.loads(json.dumps(report))
    assert md in capsys.readouterr().out
    with pytest.raises(AlignTIError, match="both give student's GQA score"):
        run_eval(EvalConfig(out=str(tmp_path / "cmp2"), report=True, dirs=[str(dirs[0]), str(dirs[0])]))
    with pytest.raises(AlignTIError, match="no scores.json"):
        run_eval(EvalConfig(out=str(tmp_path / "cmp3"), report=True, dirs=[str(tmp_path)]))


def test_report_shapes_per_question_type(tmp_path):
    qfile, _ = _shapes(tmp_path)
    questions = load_questions("shapes", qfile)
    d = _scores_dir(tmp_path, "demo", "shapes", [q.answer for q in questions])
    report = run_eval(EvalConfig(out=str(tmp_path / "cmp"), report=True, dirs=[str(d)]))
    types = sorted({q.meta["question_type"] for q in questions})
    assert report["columns"] == ["shapes"] + [f"shapes:{t}" for t in types]
    assert set(report["table"]["demo"].values()) == {100.0}


def test_report_cli_form(tmp_path):
    from click.testing import CliRunner

    from alignti.cli import cli

    dirs = [_scores_dir(tmp_path, "student", "gqa", ["yes", "table", "right"]),
            _scores_dir(tmp_path, "teacher", "gqa", ["Yes", "table", "left"])]
    res = CliRunner().invoke(cli, ["eval", "--report", *map(str, dirs), "--out", str(tmp_path / "cmp")])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "cmp" / "report.json").read_text())["models"] == ["student", "teacher"]


@pytest.mark.parametrize("image", ["n9.jpg", "n\x001.jpg", "../n1.jpg"])
def test_a_bad_question_image_is_one_line_before_the_model_loads(tmp_path, tiny_model_dir, monkeypatch, image):
    """Missing, NUL byte, outside the root: refused before the model loads and before --out exists."""
    cfg = _cfg(tmp_path, "gqa", tiny_model_dir)
    lines = Path(cfg.questions).read_text().splitlines()
    lines[1] = json.dumps({**json.loads(lines[1]), "image": image})
    Path(cfg.questions).write_text("\n".join(lines) + "\n")
    monkeypatch.setattr(run_mod, "load_model", lambda *a, **k: pytest.fail("the model loaded first"))
    with pytest.raises(AlignTIError, match="question '202': image "):
        run_eval(cfg)
    assert not (tmp_path / "out").exists()
