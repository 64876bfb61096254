"""alignti inspect (run_inspect) and bench/cache_size.py."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest

from alignti.errors import AlignTIError
from alignti.storage.inspect import InspectConfig, run_inspect
from alignti.storage.writer import CacheWriter
from tests.storage.helpers import make_samples, manifest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def cache(tmp_path):
    root = tmp_path / "c"
    samples = make_samples(20, seed=31)
    with CacheWriter.open(root, manifest(), worker=0, num_workers=1, part_size=8) as w:
        for s in samples:
            w.add(s)
        w.add_reject("a", "missing_image", "")
        w.add_reject("b", "missing_image", "")
        w.add_reject("c", "too_long", "")
    return root, samples


def disk_bytes(root: Path) -> int:
    """Bytes of cache.json and committed parts, counted independently of the reader."""
    total = (root / "cache.json").stat().st_size
    for part in (root / "parts").iterdir():
        if part.is_dir() and not part.name.startswith("."):
            total += sum(p.stat().st_size for p in part.rglob("*") if p.is_file())
    return total


def test_inspect_json(cache, capsys):
    root, samples = cache
    (root / "parts" / ".tmp-w0000-000009-1").mkdir()  # crash leftovers are not counted
    (root / "parts" / ".tmp-w0000-000009-1" / "junk").write_bytes(b"x" * 1000)
    st = run_inspect(InspectConfig(cache=str(root), json=True, verify=True))
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(json.dumps(st))
    tokens = sum(s.resp_positions.size for s in samples)
    assert printed["schema_version"] == 1 and printed["num_samples"] == 20 and printed["num_parts"] == 3
    assert printed["num_response_tokens"] == tokens
    assert printed["num_rejects"] == 3 and printed["rejects_by_reason"] == {"missing_image": 2, "too_long": 1}
    assert printed["bytes_total"] == disk_bytes(root)
    per = printed["bytes_per_response_token"]
    assert set(per) == {"topk", "tpa", "iva_saliency", "iva_topk", "metadata", "rejects", "total"}
    assert per["total"] == pytest.approx((printed["bytes_total"] - (root / "cache.json").stat().st_size) / tokens)
    mass = np.mean(np.concatenate([np.exp(s.topk_logprobs.astype(np.float64)).sum(-1) for s in samples]))
    assert printed["mean_topk_mass"] == pytest.approx(mass, abs=2e-3)  # within the quantisation bound


def test_inspect_table_and_errors(cache, capsys, tmp_path):
    root, _ = cache
    run_inspect(InspectConfig(cache=f"file://{root}"))
    out = capsys.readouterr().out
    assert "samples              20 in 3 parts" in out and "missing_image" in out and "topk" in out
    with pytest.raises(AlignTIError, match="not an alignti cache"):
        run_inspect(InspectConfig(cache=str(tmp_path / "nothing")))


def test_bench_cache_size_meets_targets(tmp_path):
    spec = importlib.util.spec_from_file_location("cache_size", REPO / "bench" / "cache_size.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    r = bench.main(["--samples", "48", "--part-size", "48", "--read-seconds", "0.2", "--no-encodings", "--json",
                    "--out", str(tmp_path / "bench")])
    per = r["bytes_per_response_token"]
    assert per["topk"] <= 200 and per["total"] <= 1536
    assert per["topk"] < r["raw_bytes_per_response_token"]["topk"] / 2
    assert all(x["samples_per_s"] > 0 for x in r["read"])
    assert os.path.exists(tmp_path / "bench" / "cache.json")


def with_topk_mass(samples, head: float):
    """The samples with every top-k row keeping `head` on its first id and 1e-4 on each other."""
    out = []
    for s in samples:
        k = s.topk_logprobs.shape[1]
        row = np.log(np.r_[head, np.full(k - 1, 1e-4)]).astype(np.float32)
        out.append(dataclasses.replace(s, topk_logprobs=np.tile(row, (s.topk_logprobs.shape[0], 1))))
    return out


@pytest.mark.parametrize("head", [0.5, 0.95])
def test_retained_mass_distribution_and_warning(tmp_path, capsys, head):
    samples = make_samples(20, seed=32)
    samples[:10] = with_topk_mass(samples[:10], head)  # two populations: the distribution shows both
    root = tmp_path / "c"
    with CacheWriter.open(root, manifest(), worker=0, num_workers=1, part_size=8) as w:
        for s in samples:
            w.add(s)
    st = run_inspect(InspectConfig(cache=str(root)))
    table, err = capsys.readouterr()
    mass = np.concatenate([np.exp(s.topk_logprobs.astype(np.float64)).sum(-1) for s in samples])
    d = st["retained_mass"]["topk"]
    assert d["rows"] == mass.size and sum(d["histogram"]["counts"]) == mass.size
    for q, ref in zip(("min", "p5", "p50", "p95", "max"), np.quantile(mass, [0, 0.05, 0.5, 0.95, 1])):
        assert d[q] == pytest.approx(ref, abs=2e-3), q  # within the quantisation bound
    assert d["mean"] == pytest.approx(mass.mean(), abs=2e-3) == st["mean_topk_mass"]
    counts, _ = np.histogram(mass, bins=d["histogram"]["edges"])
    assert sum(abs(a - b) for a, b in zip(counts, d["histogram"]["counts"])) <= 2  # rows on an edge may move
    assert all(q in table for q in ("p5", "p50", "p95")) and f"{d['p50']:.3f}" in table
    warned = [w for w in st["warnings"] if w.startswith("mean retained topk mass")]
    assert bool(warned) == (mass.mean() < 0.8) and (mass.mean() < 0.8) == (head == 0.5)
    assert bool(warned) == ("warning: mean retained topk mass" in err)
