"""A killed and resumed `alignti extract` equals an uninterrupted one, bit for bit.

Both caches are read as docs/cache-format.md says, with zarr and pyarrow alone (not
alignti.storage), and compared sample by sample and array by array: every stored array (the
log-prob codes, not decoded floats), every samples.parquet column but the part-relative
`*_start` offsets, and the rejects.

The teacher runs in bf16, as on a GPU: a sample's outputs then move by up to ~0.05 nats with
its batch mates (padding width), so a resume that batched differently shows in the stored codes.
In fp32 they move by ~1e-6 and cross a 2^-10 code step too rarely for a test to see.
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import zarr

from alignti.extract.run import ExtractConfig, run_extract
from alignti.models.family import save_model_dir
from tests.helpers.models import shapes_teacher

REPO = Path(__file__).resolve().parents[2]
OPTS = {"top_k": 8, "tpa_d": 2, "tpa_top_k": 4, "iva_max_positions": 4, "iva_top_k": 4, "iva_layer": "1",
        "batch_size": 8, "part_size": 5, "max_length": 160, "dtype": "bf16"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """(teacher dir, corpus, image root, good rows): shapes rows, more than one length-grouping
    buffer of them (batch 8 x 16 = 128 samples), with bad rows among them, one after that buffer."""
    root = tmp_path_factory.mktemp("resume")
    model, processor, shapes = shapes_teacher(root, n=156, seed=3)
    teacher = save_model_dir(model, processor, root / "teacher")
    rows = json.loads((shapes / "train.json").read_text())
    assert len(rows) > 135
    bad = [{"id": "bad-missing", "image": "images/none.png", "conversations": rows[0]["conversations"]},
           {"id": "bad-outside", "image": "../../etc/passwd", "conversations": rows[0]["conversations"]},
           {"id": "bad-no-answer", "image": rows[0]["image"], "conversations": rows[0]["conversations"][:1]},
           {"id": "bad-long", "image": rows[0]["image"],
            "conversations": [{"from": "human", "value": "<image>\n" + "red " * 200}, {"from": "gpt", "value": "a"}]}]
    lines = [json.dumps(r) for r in rows]
    for i, b in zip((135, 90, 60, 30), bad):  # from the back, so the indices stay those of good rows
        lines.insert(i, json.dumps(b))
    lines.insert(45, "{not json")
    (root / "corpus.jsonl").write_text("\n".join(lines) + "\n")
    return teacher, root / "corpus.jsonl", shapes, len(rows)


def read_by_doc(root: Path) -> tuple[dict[str, dict], list[tuple[str, str, str]]]:
    """{sample_id: {column or array name: value}} and sorted (source_id, reason, detail) rejects
    of every committed part, following docs/cache-format.md."""
    samples, rejects = {}, []
    parts = sorted(p for p in (root / "parts").iterdir() if p.is_dir() and not p.name.startswith("."))
    for part in parts:
        group = zarr.open_group(str(part / "signals.zarr"), mode="r")
        arrays = {name: (group[name][:], group[name].attrs["group"]) for name in group.array_keys()}
        for row in pq.read_table(part / "samples.parquet").to_pylist():
            sample = {k: v for k, v in row.items() if not k.endswith("_start")}
            for name, (values, grp) in arrays.items():
                start, count = row[f"{grp}_start"], row[f"{grp}_count"]
                sample[name] = values[start:start + count]
            assert row["sample_id"] not in samples, f"{row['sample_id']} committed twice"
            samples[row["sample_id"]] = sample
        rejects += [tuple(r.values()) for r in pq.read_table(part / "rejects.parquet").to_pylist()]
    return samples, sorted(rejects)


def extract(kill: str, out: Path, teacher: Path, data: Path, image_root: Path, *extra: str) -> int:
    """The extract CLI in a subprocess that SIGKILLs itself at `kill` (tests/extract/killed_extract.py)."""
    args = ["extract", "--teacher", str(teacher), "--data", str(data), "--image-root", str(image_root),
            "--out", str(out), *extra]
    for key, value in OPTS.items():
        args += ["--" + key.replace("_", "-"), str(value)]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    res = subprocess.run([sys.executable, "-m", "tests.extract.killed_extract", kill, *args], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode in (0, -signal.SIGKILL), res.stderr[-3000:]
    return res.returncode


def test_killed_and_resumed_extract_is_identical(corpus, tmp_path):
    teacher, data, image_root, n_good = corpus
    ref = tmp_path / "ref"
    run_extract(ExtractConfig(teacher=str(teacher), data=str(data), image_root=str(image_root), out=str(ref), **OPTS))
    expected, expected_rejects = read_by_doc(ref)
    assert len(expected) == n_good and len(expected_rejects) == 5

    out = tmp_path / "killed"
    # Killed right after the second part: the second teacher batch (8 samples) is cut after its
    # 2nd sample, so the resumed run must run that batch again to give its other 6 the same mates.
    assert extract("after:w0000-000001", out, teacher, data, image_root) == -signal.SIGKILL
    assert len(read_by_doc(out)[0]) == 10
    # Killed inside the commit of part 25 (samples 126-130 by length order: the end of the first
    # buffer and the start of the second), its temp dir complete but not renamed.
    assert extract("before:w0000-000025", out, teacher, data, image_root, "--resume") == -signal.SIGKILL
    assert [p.name for p in (out / "parts").iterdir() if p.name.startswith(".tmp-w0000-000025-")]
    assert len(read_by_doc(out)[0]) == 125 < n_good
    assert extract("never", out, teacher, data, image_root, "--resume") == 0
    assert not [p.name for p in (out / "parts").iterdir() if p.name.startswith(".tmp-")]

    got, rejects = read_by_doc(out)
    assert rejects == expected_rejects
    assert sorted(got) == sorted(expected)
    assert all(got[sid].keys() == want.keys() for sid, want in expected.items())
    differ = [f"{sid[:8]}.{name}" for sid, want in expected.items() for name, value in want.items()
              if not same(got[sid].get(name), value)]
    assert not differ, f"{len(differ)} (sample, field) pairs differ: {differ[:8]}"


def same(a: object, b: object) -> bool:
    if isinstance(b, np.ndarray):
        return isinstance(a, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b)
    return a == b
