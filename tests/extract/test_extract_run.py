"""`alignti extract` end to end: rejects, workers, CLI errors (kill + resume: test_extract_resume.py)."""

import dataclasses
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from alignti.cliargs import to_argv
from alignti.data.encode import SampleEncoder
from alignti.errors import AlignTIError
from alignti.extract.irs import calibration_samples, compute_irs
from alignti.extract.run import run_extract
from alignti.models.family import load_parts
from alignti.models.loading import load_model
from alignti.storage.reader import CacheReader
from alignti.storage.schema import LOGPROB_STEP
from tests.helpers.extract_world import extract_cfg, extract_world

CLI = [sys.executable, "-c", "from alignti.cli import main; main()"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return extract_world(tmp_path_factory.mktemp("extract"))


cfg = extract_cfg


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
    assert summary["rejects"] == {"missing_image": 2, "corrupt_image": 1, "path_outside_root": 1,
                                  "no_assistant_turn": 1, "image_token_mismatch": 1, "too_long": 1,
                                  "malformed_row": 1}
    n_train = len(json.loads((world[2] / "train.json").read_text()))
    assert summary["cache_samples"] == summary["samples_written"] == n_train
    r = CacheReader.open(str(tmp_path / "c"))
    s = r.manifest.settings
    assert s.iva_layer is not None and len(s.irs_scores) == 3 and s.iva_layer == int(np.argmax(s.irs_scores))
    assert len(r.rejects()) == 8
    assert any("is not a usable path (embedded null byte)" in x["detail"] for x in r.rejects())
    # IRS scores are stored exactly (JSON floats round-trip), so l* can be re-derived from cache.json
    root, teacher, shapes = world
    model, processor = load_model(str(teacher)), load_parts(str(teacher))
    calib = calibration_samples(SampleEncoder(processor, str(shapes), 160), str(root / "corpus.jsonl"), 8)
    scores = compute_irs(model, calib, processor.tokenizer.pad_token_id, batch_size=4)
    assert json.loads((tmp_path / "c" / "cache.json").read_text())["settings"]["irs_scores"] == scores.tolist()
    # a second run without --resume/--overwrite refuses, touching nothing
    with pytest.raises(AlignTIError, match="already holds a cache; pass --resume to continue it or --overwrite"):
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


def test_inputs_and_output_are_checked_before_any_work(world, tmp_path, monkeypatch):
    """A missing corpus or image root, or an existing cache, is one line before the teacher loads, IRS
    runs or anything is written (the corrected rerun is then not refused as "already holds a cache")."""
    import alignti.extract.run as run

    run_extract(cfg(world, tmp_path / "existing", iva_layer="none", limit=2))
    monkeypatch.setattr(run, "load_model", lambda *a, **k: pytest.fail("teacher loaded before the check"))
    monkeypatch.setattr(run, "load_parts", lambda *a, **k: pytest.fail("teacher loaded before the check"))
    (tmp_path / "a-file").write_text("x")
    for kw, message in [(dict(data=str(tmp_path / "missing.json")), "corpus file .*missing.json' does not exist"),
                        (dict(data=str(tmp_path)), "is not a file"),
                        (dict(image_root=str(tmp_path / "nope")), "--image-root .*nope' does not exist"),
                        (dict(image_root=str(tmp_path / "a-file")), "--image-root .*a-file' is not a directory"),
                        (dict(top_k=10**6), "--top-k 1000000 exceeds the teacher's vocabulary"),
                        (dict(iva_top_k=10**6), "--iva-top-k 1000000 exceeds the teacher's vocabulary")]:
        with pytest.raises(AlignTIError, match=message):
            run_extract(cfg(world, tmp_path / "c", **kw))
        assert not (tmp_path / "c").exists()
    with pytest.raises(AlignTIError, match="already holds a cache; pass --resume"):
        run_extract(cfg(world, tmp_path / "existing"))  # --iva-layer auto: IRS would run first


def test_retry_rejects_after_fixing_the_images(world, tmp_path):
    """Committed rejects are final on --resume; --resume --retry-rejects tries them again: a row that now
    works becomes a sample, one that fails again stays one reject (inspect counts it once)."""
    from alignti.storage.stats import cache_stats

    _, _, shapes = world
    rows = json.loads((shapes / "train.json").read_text())[:4]
    images = tmp_path / "root"
    shutil.copytree(shapes / "images", images / "images")
    rows[2]["image"] = "images/never.png"
    (tmp_path / "corpus.json").write_text(json.dumps(rows))
    moved = tmp_path / "moved.png"
    (images / rows[1]["image"]).rename(moved)  # missing in the first run, restored afterwards
    c = cfg(world, tmp_path / "c", data=str(tmp_path / "corpus.json"), image_root=str(images), iva_layer="1")

    def state():
        r = CacheReader.open(str(c.out))
        return len(r), sorted((x["source_id"], x["reason"]) for x in r.rejects()), cache_stats(r, 0)["num_rejects"]

    assert run_extract(c)["rejects"] == {"missing_image": 2}
    moved.rename(images / rows[1]["image"])
    run_extract(dataclasses.replace(c, resume=True))
    assert state() == (2, [(rows[1]["id"], "missing_image"), (rows[2]["id"], "missing_image")], 2)
    for written in (1, 0):  # the second retry finds nothing new: no duplicated sample or reject
        summary = run_extract(dataclasses.replace(c, resume=True, retry_rejects=True))
        assert summary["samples_written"] == written and summary["rejects"] == {"missing_image": 1}
        assert state() == (3, [(rows[2]["id"], "missing_image")], 1)


def test_disk_full_is_one_line(world, tmp_path, monkeypatch, capsys):
    """`alignti extract` on a disk that fills up: one error line naming the part, no traceback, no
    temp dir, the parts committed before it valid."""
    import errno
    import os

    import alignti.storage.writer as writer_mod
    from alignti.cli import main

    real_write_signals, calls = writer_mod.write_signals, []

    def full_on_second_part(tmp, arrays):
        calls.append(tmp)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_write_signals(tmp, arrays)

    monkeypatch.setattr(writer_mod, "write_signals", full_on_second_part)
    c = cfg(world, tmp_path / "c", iva_layer="1", part_size=4, batch_size=4, limit=12)
    monkeypatch.setattr(sys, "argv", ["alignti", "extract", *to_argv(c)])
    with pytest.raises(SystemExit) as exit_info:
        main()
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err and err.count("alignti: error:") == 1, err
    assert "alignti: error: cannot write cache part " + str(tmp_path / "c" / "parts" / "w0000-000001") + \
        ": No space left on device" in err
    assert len(calls) == 2 and sorted(p.name for p in (tmp_path / "c" / "parts").iterdir()) == [
        ".lock-w0000", "w0000-000000"]
    assert len(CacheReader.open(str(tmp_path / "c"))) == 4
