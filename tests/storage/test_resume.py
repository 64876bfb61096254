"""Resume, overwrite, refusals that touch nothing, worker locks and the reject policy."""

from __future__ import annotations

import dataclasses

import pytest

from alignti.errors import AlignTIError
from alignti.storage.reader import CacheReader
from alignti.storage.schema import CacheSettings
from alignti.storage.writer import CacheWriter, resolve_worker
from tests.storage.helpers import SETTINGS, assert_same_signals, manifest, tree_snapshot


def open_w(root, **kw):
    kw.setdefault("worker", 0)
    kw.setdefault("num_workers", 1)
    return CacheWriter.open(root, kw.pop("m", manifest()), **kw)


def test_resume_skips_committed_and_continues_numbering(tmp_path, samples):
    root = tmp_path / "c"
    with open_w(root, part_size=4) as w:
        for s in samples[:10]:
            w.add(s)
    with open_w(root, resume=True, part_size=4) as w:
        assert w.committed_ids() == {s.sample_id for s in samples[:10]}
        assert not w.add(samples[3])  # committed already: skipped
        for s in samples[10:]:
            if s.sample_id not in w.committed_ids():
                assert w.add(s)
        assert not w.add(samples[12])  # buffered or committed: skipped
        assert w.num_duplicates == 2
    r = CacheReader.open(str(root))
    assert sorted(r.sample_ids) == sorted(s.sample_id for s in samples) and r.num_duplicates == 0
    assert [p.name for p in r.parts] == [f"w0000-{i:06d}" for i in range(8)]
    for a, b in zip(sorted(samples, key=lambda s: s.sample_id), r.get_batch(range(len(r)))):
        assert_same_signals(a, b)


@pytest.mark.parametrize("change,field", [
    (lambda: manifest(dataclasses.replace(SETTINGS, top_k=16)), "settings.top_k"),
    (lambda: manifest(dataclasses.replace(SETTINGS, iva_layer=3)), "settings.iva_layer"),
    (lambda: manifest(weights="weights-hash-1"), "teacher_fingerprint.weights"),
    (lambda: manifest(tokenizer="tok-2"), "teacher_fingerprint.tokenizer"),
])
def test_resume_with_other_teacher_or_settings_refused_untouched(tmp_path, samples, change, field):
    root = tmp_path / "c"
    with open_w(root, part_size=4) as w:
        for s in samples[:6]:
            w.add(s)
    before = tree_snapshot(root)
    with pytest.raises(AlignTIError, match=field.replace(".", r"\.")) as e:
        open_w(root, m=change(), resume=True)
    assert "\n" not in str(e.value)
    assert tree_snapshot(root) == before


def test_existing_cache_needs_resume_or_overwrite(tmp_path, samples):
    root = tmp_path / "c"
    with open_w(root) as w:
        w.add(samples[0])
    before = tree_snapshot(root)
    with pytest.raises(AlignTIError, match="pass --resume to continue it or --overwrite to replace it"):
        open_w(root)
    with pytest.raises(ValueError, match="mutually exclusive"):  # the CLI refuses it first
        open_w(root, resume=True, overwrite=True)
    assert tree_snapshot(root) == before
    with open_w(root, overwrite=True, m=manifest(dataclasses.replace(SETTINGS, seed=9))) as w:
        assert w.committed_ids() == set()
        w.add(samples[1])
    r = CacheReader.open(str(root))
    assert r.sample_ids == [samples[1].sample_id] and r.manifest.settings.seed == 9


def test_refuses_foreign_directory(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    for kw in ({}, {"overwrite": True}, {"resume": True}):
        with pytest.raises(AlignTIError, match="not an alignti cache"):
            open_w(tmp_path / "mine", **kw)
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["thesis.tex"]
    with pytest.raises(AlignTIError, match="local path"):
        open_w("s3://bucket/cache")


def test_worker_lock_and_worker_resolution(tmp_path, samples, monkeypatch):
    root = tmp_path / "c"
    w0 = open_w(root, worker=0, num_workers=2)
    with pytest.raises(AlignTIError, match="already writing worker 0"):
        open_w(root, worker=0, num_workers=2, resume=True)
    w1 = open_w(root, worker=1, num_workers=2, resume=True)
    w0.add(samples[0])
    w1.add(samples[1])
    w0.close()
    w1.close()
    assert [p.name for p in CacheReader.open(str(root)).parts] == ["w0000-000000", "w0001-000000"]
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert resolve_worker(None, None) == (3, 4)
    assert resolve_worker(1, 2) == (1, 2)
    with pytest.raises(AlignTIError):
        resolve_worker(2, 2)
    with pytest.raises(ValueError):
        resolve_worker(1, None)


def test_rejects_committed_with_parts_and_not_retried(tmp_path, samples):
    root = tmp_path / "c"
    with open_w(root, part_size=3) as w:
        w.add_reject("row-1", "missing_image", "img/1.jpg not found")
        assert not w.add_reject("row-1", "missing_image", "again")  # deduplicated in the buffer
        w.add_reject("row-2", "too_long", "4100 > 2048 tokens")
        for s in samples[:4]:
            w.add(s)
        with pytest.raises(ValueError):
            w.add_reject("row-3", "Bad Reason!", "")
    with open_w(root, resume=True) as w:
        assert w.rejected_source_ids() == {"row-1", "row-2"}
        assert not w.add_reject("row-2", "too_long", "seen again")  # committed: not recorded twice
        w.add_reject("row-4", "corrupt_image", "")
    rej = CacheReader.open(str(root)).rejects()
    assert [(r["source_id"], r["reason"]) for r in rej] == [
        ("row-1", "missing_image"), ("row-2", "too_long"), ("row-4", "corrupt_image")]


def test_retry_rejects_supersedes(tmp_path, samples):
    root = tmp_path / "c"
    fixed = dataclasses.replace(samples[0], source_id="row-1")
    with open_w(root) as w:
        w.add_reject("row-1", "missing_image", "")
        w.add_reject("row-2", "missing_image", "")
    with open_w(root, resume=True, retry_rejects=True) as w:
        assert w.rejected_source_ids() == set()  # extract retries everything
        w.add(fixed)  # the image was restored: now a sample
        assert w.add_reject("row-2", "corrupt_image", "still broken")  # recorded again, newer reason
    r = CacheReader.open(str(root))
    assert r.rejects() == [{"source_id": "row-2", "reason": "corrupt_image", "detail": "still broken",
                            "part": "w0000-000001"}]
    with open_w(root, resume=True) as w:
        assert w.rejected_source_ids() == {"row-2"}


def test_irs_scores_are_informative(tmp_path, samples):
    root = tmp_path / "c"
    with open_w(root, m=manifest(dataclasses.replace(SETTINGS, iva_layer=2, irs_scores=[0.1, 0.3]))) as w:
        w.add(samples[0])
    noisy = manifest(dataclasses.replace(SETTINGS, iva_layer=2, irs_scores=[0.1000001, 0.3]))
    with open_w(root, m=noisy, resume=True) as w:
        w.add(samples[1])
    r = CacheReader.open(str(root))
    assert len(r) == 2 and r.manifest.settings.irs_scores == [0.1, 0.3]  # cache.json is never rewritten
    with pytest.raises(AlignTIError, match="iva_layer"):
        open_w(root, m=manifest(dataclasses.replace(SETTINGS, iva_layer=3, irs_scores=[0.1, 0.3])), resume=True)


def test_settings_json_round_trip(tmp_path):
    s = CacheSettings(top_k=8, tpa_max_positions=5, iva_layer=2, irs_scores=[0.1, 0.25], tpa_proposal="sample")
    with open_w(tmp_path / "c", m=manifest(s)):
        pass
    r = CacheReader.open(str(tmp_path / "c"))
    assert r.manifest.settings == s and len(r) == 0 and r.get_batch([]) == []


def test_overwrite_replaces_cache_of_another_schema_version(tmp_path, samples):
    root = tmp_path / "c"
    with open_w(root) as w:
        w.add(samples[0])
    (root / "cache.json").write_text('{"schema_version": 99}')
    with pytest.raises(AlignTIError, match="schema_version 99"):
        open_w(root, resume=True)
    with open_w(root, overwrite=True) as w:
        w.add(samples[1])
    assert CacheReader.open(str(root)).sample_ids == [samples[1].sample_id]


def test_multi_worker_overwrite(tmp_path, samples):
    """Old run: 3 workers, other settings. New run: 2 workers with overwrite, worker 1 starting first."""
    import threading

    root = tmp_path / "c"
    old = manifest(dataclasses.replace(SETTINGS, seed=1))
    for k in range(3):
        with open_w(root, m=old, worker=k, num_workers=3, resume=True) as w:
            w.add(samples[k])
    new = manifest()
    opened: dict[int, CacheWriter] = {}

    def start(k: int) -> None:
        opened[k] = open_w(root, m=new, worker=k, num_workers=2, overwrite=True)

    t = threading.Thread(target=start, args=(1,))
    t.start()  # deletes its own old parts, then waits for worker 0's cache.json
    start(0)
    t.join(timeout=30)
    for k, w in opened.items():
        w.add(samples[10 + k])
        w.close()
    r = CacheReader.open(str(root))
    assert sorted(r.sample_ids) == sorted([samples[10].sample_id, samples[11].sample_id])
    assert r.manifest.settings == SETTINGS and [p.name for p in r.parts] == ["w0000-000000", "w0001-000000"]


def test_overwrite_on_a_new_path_creates_the_cache(tmp_path, samples):
    """`extract --overwrite` on a path that does not exist yet (a fresh run with the same command)."""
    root = tmp_path / "new" / "c"
    with open_w(root, overwrite=True) as w:
        w.add(samples[0])
    assert CacheReader.open(str(root)).sample_ids == [samples[0].sample_id]
    (tmp_path / "foreign" / "parts").mkdir(parents=True)
    (tmp_path / "foreign" / "parts" / "mine.txt").write_text("not a lock")
    with pytest.raises(AlignTIError, match="not an alignti cache"):
        open_w(tmp_path / "foreign", overwrite=True)


def test_a_full_disk_is_one_line_and_committed_parts_stay(tmp_path, samples, monkeypatch):
    """ENOSPC while writing a part: one AlignTIError naming the part, its temp dir removed, no second
    commit when the `with` block exits, the lock released, the parts before it intact and resumable."""
    import errno
    import os

    import alignti.storage.writer as writer_mod

    calls = []

    def full_on_second_part(tmp, arrays):
        calls.append(tmp)
        if len(calls) == 2:
            (tmp / "half-written").write_bytes(b"x")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_write_signals(tmp, arrays)

    real_write_signals = writer_mod.write_signals
    monkeypatch.setattr(writer_mod, "write_signals", full_on_second_part)
    root = tmp_path / "c"
    with pytest.raises(AlignTIError, match=r"^cannot write cache part .*/parts/w0000-000001: No space left on "
                                           r"device \(.* MiB free there\)$"):
        with open_w(root, part_size=4) as w:
            for s in samples[:10]:
                w.add(s)
    assert len(calls) == 2  # leaving the block did not try again
    assert sorted(p.name for p in (root / "parts").iterdir()) == [".lock-w0000", "w0000-000000"]  # no temp dir
    monkeypatch.setattr(writer_mod, "write_signals", real_write_signals)  # space freed
    with open_w(root, resume=True, part_size=4) as w:  # the lock is free and the committed part is valid
        assert w.committed_ids() == {s.sample_id for s in samples[:4]}
        for s in samples[4:10]:
            w.add(s)
    r = CacheReader.open(str(root))
    r.verify()
    assert sorted(r.sample_ids) == sorted(s.sample_id for s in samples[:10])
