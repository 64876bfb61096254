"""`alignti extract` end to end: rejects, workers, CLI errors (kill + resume: test_extract_resume.py)."""

import json
import subprocess
import sys

import numpy as np
import pytest

from alignti.data.encode import SampleEncoder
from alignti.errors import AlignTIError
from alignti.extract.irs import calibration_samples, compute_irs
from alignti.extract.run import ExtractConfig, run_extract
from alignti.models.family import load_parts, save_model_dir
from alignti.models.loading import load_model
from alignti.storage.reader import CacheReader
from alignti.storage.schema import LOGPROB_STEP
from tests.helpers.models import shapes_teacher

CLI = [sys.executable, "-c", "from alignti.cli import main; main()"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("extract")
    model, processor, shapes = shapes_teacher(root, n=40, seed=1)
    teacher = save_model_dir(model, processor, root / "teacher")
    rows = json.loads((shapes / "train.json").read_text())
    (shapes / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\ntruncated")
    q = lambda img, convs: {"id": f"bad-{len(bad)}", "image": img,  # noqa: E731
                            "conversations": [{"from": f, "value": v} for f, v in convs]}
    bad = []
    bad.append(q("images/none.png", [("human", "<image>\nq"), ("gpt", "a")]))
    bad.append(q("bad.png", [("human", "<image>\nq"), ("gpt", "a")]))
    bad.append(q("../../etc/passwd", [("human", "<image>\nq"), ("gpt", "a")]))
    bad.append(q(rows[0]["image"], [("human", "<image>\nq")]))
    bad.append(q(rows[0]["image"], [("human", "q"), ("gpt", "a")]))
    bad.append(q(rows[0]["image"], [("human", "<image>\n" + "red " * 200), ("gpt", "a")]))
    lines = [json.dumps(r) for r in rows + bad]
    lines.insert(3, "{not json")
    (root / "corpus.jsonl").write_text("\n".join(lines) + "\n")
    return root, teacher, shapes


def cfg(world, out, **kw):
    root, teacher, shapes = world
    base = dict(teacher=str(teacher), data=str(root / "corpus.jsonl"), image_root=str(shapes), out=str(out),
                top_k=8, tpa_d=2, tpa_top_k=4, iva_max_positions=4, iva_top_k=4, irs_samples=8, batch_size=4,
                max_length=160, part_size=6)
    base.update(kw)
    return ExtractConfig(**base)


def cache_content(path):
    r = CacheReader.open(str(path))
    return {s.sample_id: s for s in r.get_batch(list(range(len(r))))}


def assert_same_content(a, b):
    assert set(a) == set(b)
    for sid, x in a.items():
        y = b[sid]
        for name in ("topk_ids", "tpa_cand_ids", "tpa_topk_ids", "iva_positions", "iva_topk_ids", "text_ids"):
            np.testing.assert_array_equal(getattr(x, name), getattr(y, name), err_msg=f"{sid} {name}")
        for name in ("topk_logprobs", "tpa_cand_logprobs", "tpa_topk_logprobs", "iva_topk_logprobs"):
            np.testing.assert_allclose(getattr(x, name), getattr(y, name), atol=1.01 * LOGPROB_STEP)
        np.testing.assert_allclose(x.saliency, y.saliency, atol=1e-3)


def test_full_run_records_every_reject_kind(world, tmp_path):
    summary = run_extract(cfg(world, tmp_path / "c"))
    assert summary["rejects"] == {"missing_image": 1, "corrupt_image": 1, "path_outside_root": 1,
                                  "no_assistant_turn": 1, "image_token_mismatch": 1, "too_long": 1,
                                  "malformed_row": 1}
    n_train = len(json.loads((world[2] / "train.json").read_text()))
    assert summary["cache_samples"] == summary["samples_written"] == n_train
    r = CacheReader.open(str(tmp_path / "c"))
    s = r.manifest.settings
    assert s.iva_layer is not None and len(s.irs_scores) == 3 and s.iva_layer == int(np.argmax(s.irs_scores))
    assert len(r.rejects()) == 7
    # IRS scores are stored exactly (JSON floats round-trip), so l* can be re-derived from cache.json
    root, teacher, shapes = world
    model, processor = load_model(str(teacher)), load_parts(str(teacher))
    calib = calibration_samples(SampleEncoder(processor, str(shapes), 160), str(root / "corpus.jsonl"), 8)
    scores = compute_irs(model, calib, processor.tokenizer.pad_token_id, batch_size=4)
    assert json.loads((tmp_path / "c" / "cache.json").read_text())["settings"]["irs_scores"] == scores.tolist()
    # a second run without --resume/--overwrite refuses, touching nothing
    with pytest.raises(AlignTIError):
        run_extract(cfg(world, tmp_path / "c"))


def test_two_workers_equal_one(world, tmp_path):
    one = tmp_path / "one"
    run_extract(cfg(world, one, iva_layer="1"))
    two = tmp_path / "two"
    run_extract(cfg(world, two, iva_layer="1", worker="0/2"))
    run_extract(cfg(world, two, iva_layer="1", worker="1/2"))
    assert_same_content(cache_content(one), cache_content(two))


def test_cli_errors_are_one_line_exit_2(world, tmp_path):
    root, teacher, shapes = world
    res = subprocess.run(CLI + ["extract", "--teacher", str(tmp_path / "nope"), "--data", str(root / "corpus.jsonl"),
                                "--image-root", str(shapes), "--out", str(tmp_path / "x")],
                         capture_output=True, text=True)
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "config.json" in res.stderr
    res = subprocess.run(CLI + ["extract", "--teacher", str(teacher), "--data", str(root / "corpus.jsonl"),
                                "--image-root", str(shapes), "--out", str(tmp_path / "x"), "--worker", "3/2"],
                         capture_output=True, text=True)
    assert res.returncode == 2 and "--worker" in res.stderr
