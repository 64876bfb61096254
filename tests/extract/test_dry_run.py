"""`alignti extract --dry-run`: writes nothing under --out, counts the real run's samples and rejects,
and estimates the cache's bytes within 20% of the cache the real run then writes."""

import json
import os
import subprocess
import sys

import pytest

from alignti.extract.run import run_extract
from alignti.storage.reader import CacheReader
from alignti.storage.stats import cache_stats
from tests.helpers.extract_world import extract_cfg as cfg, extract_world

CLI = [sys.executable, "-c", "from alignti.cli import main; main()"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return extract_world(tmp_path_factory.mktemp("extract"))


@pytest.mark.parametrize("options", [dict(iva_layer="auto", part_size=6),  # IRS, several parts
                                     dict(iva_layer="1", tpa_max_positions=3, part_size=64, top_k=16, batch_size=2)])
def test_dry_run_writes_nothing_and_estimates_the_cache(world, tmp_path, options):
    c = cfg(world, tmp_path / "cache", **options)
    args = ["extract", "--dry-run", "--teacher", c.teacher, "--data", c.data, "--image-root", c.image_root,
            "--out", c.out, "--top-k", str(c.top_k), "--tpa-d", "2", "--tpa-top-k", "4", "--iva-max-positions", "4",
            "--iva-top-k", "4", "--irs-samples", "8", "--batch-size", str(c.batch_size), "--max-length", "160",
            "--part-size", str(c.part_size), "--iva-layer", c.iva_layer]
    if c.tpa_max_positions:
        args += ["--tpa-max-positions", str(c.tpa_max_positions)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # as the in-process real run below (tests/conftest.py)
    done = subprocess.run(CLI + args, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert not (tmp_path / "cache").exists()  # not even the directory
    plan = json.loads(done.stdout)
    assert "cache estimate" in done.stderr and "wall time estimate" in done.stderr
    assert plan["wall_seconds"] > 0 and plan["teacher_tokens_per_second"] > 0

    real = run_extract(c)
    stats = cache_stats(CacheReader.open(c.out))
    assert plan["samples"] == real["samples_written"] and plan["rejects"] == real["rejects"]
    assert plan["response_tokens"] == stats["num_response_tokens"]
    assert plan["parts"] == stats["num_parts"]
    assert plan["cache_bytes"] == pytest.approx(stats["bytes_total"], rel=0.2), (plan, stats["bytes_per_signal"])
    for sig in ("topk", "tpa", "iva_topk", "metadata"):
        assert plan["cache_bytes_by_signal"][sig] == pytest.approx(stats["bytes_per_signal"][sig], rel=0.2), sig
