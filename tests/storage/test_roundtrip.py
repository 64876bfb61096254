"""Write random signals, read them back: exact, or within the documented quantisation bound."""

from __future__ import annotations

import dataclasses
import pickle

import fsspec
import numpy as np
import pytest

from alignti.errors import AlignTIError
from alignti.storage.reader import CacheReader
from alignti.storage.writer import CacheWriter
from tests.storage.helpers import SETTINGS, assert_same_signals, make_samples, manifest


def write(root, samples, part_size=7, **kw):
    with CacheWriter.open(root, manifest(), worker=0, num_workers=1, part_size=part_size, **kw) as w:
        for s in samples:
            assert w.add(s)
    return w


def test_round_trip_by_id_index_and_iteration(tmp_path, samples):
    write(tmp_path / "c", samples)
    r = CacheReader.open(str(tmp_path / "c"))
    assert len(r) == len(samples) and r.num_duplicates == 0
    assert r.sample_ids == sorted(s.sample_id for s in samples)  # index order = sorted ids
    assert r.num_response_tokens == sum(s.resp_positions.size for s in samples)
    assert len(r.parts) == 5  # 30 samples, 7 per part
    # by id, in a scrambled order with a repeat: every sample comes back where it was asked for
    order = list(np.random.default_rng(1).permutation(len(samples))) + [4]
    got = r.get_batch(r.index_of([samples[i].sample_id for i in order]))
    for i, g in zip(order, got):
        assert_same_signals(samples[i], g)
    # iteration covers every sample exactly once, order fixed by the seed
    seen = [s.sample_id for b in r.iter_batches(4, shuffle=True, seed=5) for s in b]
    assert sorted(seen) == r.sample_ids
    assert seen == [s.sample_id for b in r.iter_batches(4, shuffle=True, seed=5) for s in b]
    assert seen != [s.sample_id for b in r.iter_batches(4, shuffle=True, seed=6) for s in b]
    resumed = [s.sample_id for b in r.iter_batches(4, shuffle=True, seed=5, start_batch=3) for s in b]
    assert resumed == seen[12:]
    assert [len(b) for b in r.iter_batches(8, shuffle=False, drop_last=True)] == [8, 8, 8]


def test_edge_cases_survive(tmp_path):
    samples = make_samples(30, seed=2)
    kinds = {(s.n_v == 0, s.resp_positions.size == 0) for s in samples}
    assert {(True, False), (False, True), (False, False)} <= kinds  # text-only and empty-response samples exist
    write(tmp_path / "c", samples, part_size=30)
    r = CacheReader.open(str(tmp_path / "c"))
    for a, b in zip(samples, r.get_batch(r.index_of([s.sample_id for s in samples]))):
        assert_same_signals(a, b)


def test_exact_grid_values_round_trip_exactly(tmp_path):
    """Log-probs already on the 2^-10 grid come back bit-identical (no drift through delta coding)."""
    s = make_samples(3, seed=4)
    q = 2.0**-10
    grid = [dataclasses.replace(x, topk_logprobs=(np.ceil(x.topk_logprobs.astype(np.float64) / q) * q)
                                .astype(np.float32)) for x in s]
    write(tmp_path / "c", grid)
    r = CacheReader.open(str(tmp_path / "c"))
    back = r.get_batch(r.index_of([x.sample_id for x in grid]))
    for a, b in zip(grid, back):
        assert np.array_equal(a.topk_logprobs, b.topk_logprobs)


def test_fsspec_file_url_and_memory_fs(tmp_path, samples):
    write(tmp_path / "c", samples)
    by_path = CacheReader.open(str(tmp_path / "c"))
    by_url = CacheReader.open(f"file://{tmp_path / 'c'}")
    assert by_url.sample_ids == by_path.sample_ids
    for a, b in zip(by_path.get_batch(range(len(samples))), by_url.get_batch(range(len(samples)))):
        assert_same_signals(a, b, exact_logprobs=True)
    clone = pickle.loads(pickle.dumps(by_url))  # DataLoader workers started with spawn re-open the cache
    assert clone.sample_ids == by_path.sample_ids and clone.loc.url == by_url.loc.url
    mem = fsspec.filesystem("memory")
    mem.put(str(tmp_path / "c"), "/cachecopy", recursive=True)
    by_mem = CacheReader.open("memory://cachecopy")
    for a, b in zip(by_path.get_batch([0, 9, 29]), by_mem.get_batch([0, 9, 29])):
        assert_same_signals(a, b, exact_logprobs=True)


@pytest.mark.parametrize("field,make,match", [
    ("topk_ids", lambda s: s.topk_ids[:, :7].copy(), "k=7, expected 8"),
    ("topk_logprobs", lambda s: s.topk_logprobs[:, ::-1].copy(), "descending"),
    ("tpa_rows", lambda s: s.tpa_rows[::-1].copy(), "ascending"),
    ("saliency", lambda s: np.full(3, 1 / 3, np.float32), "n_v"),
    ("topk_ids", lambda s: np.full(s.topk_ids.shape, 10**6, np.int64), "token ids"),
    ("iva_positions", lambda s: np.full(s.iva_positions.shape, s.n_v, np.int32), "iva_positions"),
    ("sample_id", lambda s: "", "empty sample_id"),
    ("text_ids", lambda s: s.text_ids.astype(np.float32), "integer"),
])
def test_invalid_samples_are_refused(tmp_path, field, make, match):
    s = make_samples(1, seed=7)[0]
    assert s.resp_positions.size > 2 and s.n_v > 0
    bad = dataclasses.replace(s, **{field: make(s)})
    with CacheWriter.open(tmp_path / "c", manifest(), worker=0, num_workers=1) as w:
        with pytest.raises(ValueError, match=match):
            w.add(bad)
        assert w.add(s)


def test_nan_and_positive_logprobs_refused(tmp_path):
    s = make_samples(2, seed=8)[0]
    lp = s.topk_logprobs.copy()
    lp[0, 0] = np.nan
    with CacheWriter.open(tmp_path / "c", manifest(), worker=0, num_workers=1) as w:
        with pytest.raises(ValueError, match="log-probs"):
            w.add(dataclasses.replace(s, topk_logprobs=lp))
        with pytest.raises(ValueError, match="log-probs"):
            w.add(dataclasses.replace(s, topk_logprobs=s.topk_logprobs + 1.0))


def test_writer_refuses_incomplete_fingerprint(tmp_path):
    m = manifest()
    fp = dict(m.teacher_fingerprint)
    del fp["chat_template"]
    with pytest.raises(ValueError, match="chat_template"):
        CacheWriter.open(tmp_path / "c", dataclasses.replace(m, teacher_fingerprint=fp), worker=0, num_workers=1)
    assert not (tmp_path / "c").exists()


def test_check_student(tmp_path, samples):
    write(tmp_path / "c", samples[:3])
    r = CacheReader.open(str(tmp_path / "c"))
    student = dict(r.manifest.teacher_fingerprint, weights="other", config="other", vocab_size=9)
    r.check_student(student)  # other weights / config / vocab: fine (one cache, several students)
    for key in ("tokenizer", "chat_template"):
        with pytest.raises(AlignTIError, match=key):
            r.check_student(dict(student, **{key: "different"}))
    with pytest.raises(ValueError, match="tokenizer"):  # fingerprints always have every key
        r.check_student({"chat_template": student["chat_template"]})


def test_zarr_fallback_reads_identically(tmp_path, samples, monkeypatch):
    """Arrays the direct shard decoder does not recognise are read through zarr: same values."""
    import alignti.storage.shards as shards

    write(tmp_path / "c", samples)
    fast = CacheReader.open(str(tmp_path / "c")).get_batch(range(len(samples)))
    monkeypatch.setattr(shards, "_expected_codecs", lambda meta: None)
    r = CacheReader.open(f"file://{tmp_path / 'c'}")
    for a, b in zip(fast, r.get_batch(range(len(samples)))):
        assert_same_signals(a, b, exact_logprobs=True)
    shard = tmp_path / "c" / "parts" / "w0000-000002" / "signals.zarr" / "tpa_topk_ids" / "c" / "0" / "0" / "0"
    data = bytearray(shard.read_bytes())
    data[len(data) // 4] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(AlignTIError, match="w0000-000002.*tpa_topk_ids.*corrupted"):
        CacheReader.open(str(tmp_path / "c")).get_batch(range(len(samples)))


def test_unknown_id(tmp_path, samples):
    write(tmp_path / "c", samples[:3])
    r = CacheReader.open(str(tmp_path / "c"))
    for bad in ("f" * 32, "ünïcode"):
        with pytest.raises(AlignTIError, match="not in the cache"):
            r.index_of([samples[0].sample_id, bad])
    with pytest.raises(IndexError):
        r.get_batch([3])


def test_tpa_and_iva_disabled(tmp_path):
    """tpa_d=0 and iva_max_positions=0: zero-width / empty arrays round-trip."""
    off = dataclasses.replace(SETTINGS, tpa_d=0, iva_max_positions=0)
    samples = make_samples(6, seed=12, settings=off)
    assert all(s.tpa_cand_ids.shape[1] == 0 and s.saliency.size == 0 for s in samples)
    with CacheWriter.open(tmp_path / "c", manifest(off), worker=0, num_workers=1, part_size=4) as w:
        for s in samples:
            w.add(s)
    r = CacheReader.open(str(tmp_path / "c"))
    for a, b in zip(samples, r.get_batch(r.index_of([s.sample_id for s in samples]))):
        assert_same_signals(a, b)
        assert b.tpa_topk_ids.shape == (a.resp_positions.size, 0, SETTINGS.tpa_top_k)
