"""Damaged caches: each problem is one clear AlignTIError line naming it, never garbage."""

from __future__ import annotations

import json
import shutil

import pytest

from alignti.errors import AlignTIError
from alignti.storage.reader import CacheReader
from alignti.storage.writer import CacheWriter
from tests.storage.helpers import make_samples, manifest

PART = "w0000-000001"
SHARD = "signals.zarr/topk_ids/c/0/0"


@pytest.fixture
def cache(tmp_path):
    root = tmp_path / "c"
    with CacheWriter.open(root, manifest(), worker=0, num_workers=1, part_size=10) as w:
        for s in make_samples(30, seed=5):
            w.add(s)
    return root


def one_line_error(fn, *words):
    with pytest.raises(AlignTIError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg and all(w in msg for w in words), msg
    return msg


def read_all(root):
    r = CacheReader.open(str(root))
    return r.get_batch(range(len(r)))


def test_truncated_chunk_file(cache):
    p = cache / "parts" / PART / SHARD
    p.write_bytes(p.read_bytes()[:-100])
    one_line_error(lambda: CacheReader.open(str(cache)), PART, SHARD, "truncated")


def test_edited_chunk_same_size(cache):
    p = cache / "parts" / PART / SHARD
    b = bytearray(p.read_bytes())
    b[len(b) // 3] ^= 0x5A
    p.write_bytes(bytes(b))
    r = CacheReader.open(str(cache))  # sizes match: open is cheap and succeeds
    r.get_batch([0])  # sample 0 may live in another part; reading everything must hit the edit
    one_line_error(lambda: r.get_batch(range(len(r))), PART, SHARD, "corrupted")
    one_line_error(lambda: CacheReader.open(str(cache)).verify(), PART, SHARD, "sha256")


def test_edited_shard_index(cache):
    p = cache / "parts" / PART / SHARD
    b = bytearray(p.read_bytes())
    b[-10] ^= 0x01  # inside the shard index at the end of the file
    p.write_bytes(bytes(b))
    one_line_error(lambda: read_all(cache), PART, SHARD, "corrupted")


@pytest.mark.parametrize("victim", ["samples.parquet", "rejects.parquet", "signals.zarr/tpa_topk_ids/zarr.json",
                                    "signals.zarr/iva_topk_ids/c/0/0"])
def test_deleted_part_file(cache, victim):
    (cache / "parts" / PART / victim).unlink()
    one_line_error(lambda: CacheReader.open(str(cache)), PART, victim, "missing")


def test_deleted_part_json(cache):
    (cache / "parts" / PART / "part.json").unlink()
    one_line_error(lambda: CacheReader.open(str(cache)), PART, "part.json")


def test_edited_small_file_caught_on_first_read(cache):
    p = cache / "parts" / PART / "signals.zarr/topk_logprobs/zarr.json"
    p.write_text(p.read_text().replace('"clevel": 5', '"clevel": 6'))  # same size, different bytes
    one_line_error(lambda: read_all(cache), PART, "topk_logprobs/zarr.json", "sha256")


def test_cache_json_other_schema_version(cache):
    p = cache / "cache.json"
    d = json.loads(p.read_text())
    d["schema_version"] = 99
    p.write_text(json.dumps(d))
    one_line_error(lambda: CacheReader.open(str(cache)), "schema_version 99", "reads schema_version 1")
    one_line_error(lambda: CacheWriter.open(cache, manifest(), worker=0, num_workers=1, resume=True),
                   "schema_version 99")


def test_cache_json_incomplete_fingerprint(cache):
    """The check the writer treats as a caller's bug (ValueError) is the file's fault in cache.json."""
    p = cache / "cache.json"
    d = json.loads(p.read_text())
    del d["teacher_fingerprint"]["tokenizer"]
    p.write_text(json.dumps(d))
    one_line_error(lambda: CacheReader.open(str(cache)), "cache.json teacher_fingerprint", "tokenizer")


def test_cache_json_garbage_or_missing(cache):
    (cache / "cache.json").write_text("{not json")
    one_line_error(lambda: CacheReader.open(str(cache)), "cache.json", "not valid JSON")
    (cache / "cache.json").unlink()
    one_line_error(lambda: CacheReader.open(str(cache)), "not an alignti cache")


def test_part_from_another_cache(cache, tmp_path):
    other = tmp_path / "other"
    with CacheWriter.open(other, manifest(weights="other-weights"), worker=0, num_workers=1) as w:
        w.add(make_samples(1, seed=99)[0])
    shutil.copytree(other / "parts" / "w0000-000000", cache / "parts" / "w0005-000000")
    one_line_error(lambda: CacheReader.open(str(cache)), "w0005-000000")  # part.json names another part
    shutil.rmtree(cache / "parts" / "w0005-000000")
    shutil.copytree(other / "parts" / "w0000-000000", cache / "parts" / "w0000-000000", dirs_exist_ok=True)
    one_line_error(lambda: CacheReader.open(str(cache)), "w0000-000000", "different teacher/settings")


def test_temp_and_stray_entries_are_ignored(cache):
    (cache / "parts" / ".tmp-w0003-000000-123").mkdir()
    (cache / "parts" / ".tmp-w0003-000000-123" / "junk").write_bytes(b"x" * 10)
    (cache / "parts" / "README").write_text("not a part")
    assert len(read_all(cache)) == 30
