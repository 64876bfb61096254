"""`ExampleSet` (the one example path) against a plain reference join (every corpus row encoded, its
signals looked up by content id): same examples, lengths, rejects, refusals and training results;
building it decodes no image, using it decodes only the images asked for, and a sample whose image
turns out corrupt or changed when first used is skipped and reported, never fatal."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import alignti.data.corpus
import alignti.data.encode
from alignti.data.corpus import Reject, read_corpus
from alignti.data.images import ImageInputs
from alignti.data.encode import SampleEncoder
from alignti.distill import memo, train
from alignti.distill.examples import DistillExample, cache_examples, check_iva_compatible, corpus_examples
from alignti.errors import AlignTIError
from alignti.models.llava import TinySpec, build_tiny_llava
from alignti.models.tokenizer import train_tokenizer
from alignti.storage.reader import CacheReader
from tests.distill.worlds import distill_config, make_signal_world, read_log, run_world, student_model, weights


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_signal_world(tmp_path_factory.mktemp("examples-world"))


def reference_join(reader: CacheReader | None, encoder: SampleEncoder, data: str) -> tuple[list, list]:
    """The join done the plain way: every corpus row encoded (image decoded) by the student, its signals
    found by content id among all cached samples; rows of sources the cache lacks are skipped."""
    cached = {} if reader is None else {s.sample_id: s for s in reader.get_batch(np.arange(len(reader)))}
    sources = {s.source_id for s in cached.values()}
    examples, rejects = [], []
    for row in read_corpus(data):
        if reader is not None and (isinstance(row, Reject) or row.source_id not in sources):
            continue
        sample = row if isinstance(row, Reject) else encoder.encode(row)
        if isinstance(sample, Reject):
            rejects.append(sample)
        else:
            examples.append(DistillExample(sample, cached[sample.sample_id] if reader is not None else None))
    return examples, rejects


def assert_same_example(a, b) -> None:
    """Every field of the student encoding and of the signals equal (tensors and arrays exactly)."""
    for name in a.student.__dataclass_fields__:
        x, y = getattr(a.student, name), getattr(b.student, name)
        if isinstance(x, torch.Tensor):
            assert torch.equal(x, y), name
        elif isinstance(x, ImageInputs):
            assert (x.n_v, x.grids, x.tensors.keys()) == (y.n_v, y.grids, y.tensors.keys()), name
            assert all(torch.equal(x.tensors[k], y.tensors[k]) for k in x.tensors), name
        elif isinstance(x, np.ndarray):
            assert np.array_equal(x, y), name
        else:
            assert x == y, name
    assert (a.signals is None) == (b.signals is None)
    if a.signals is not None:
        for name in a.signals.__dataclass_fields__:
            x, y = getattr(a.signals, name), getattr(b.signals, name)
            assert np.array_equal(x, y) if isinstance(x, np.ndarray) else x == y, name


class CountLoads:
    """Counts image decodes (encode.py imports load_image by name, so both modules are patched)."""

    def __init__(self, monkeypatch) -> None:
        self.calls = 0
        real = alignti.data.corpus.load_image

        def counting(path):
            self.calls += 1
            return real(path)

        monkeypatch.setattr(alignti.data.corpus, "load_image", counting)
        monkeypatch.setattr(alignti.data.encode, "load_image", counting)


def cache_set(world, encoder=None, data=None):
    return cache_examples(CacheReader.open(world.cache), encoder or world.student_encoder(), data)


def cache_reference(world, encoder=None):
    enc = encoder or world.student_encoder()
    return reference_join(CacheReader.open(world.cache), enc.with_image_root(enc.image_root or world.image_root),
                          world.data)


def test_cache_set_equals_the_reference_join_and_loads_images_on_demand(world, monkeypatch):
    ref, ref_rejects = cache_reference(world)
    loads = CountLoads(monkeypatch)
    examples, rejects = cache_set(world)
    assert loads.calls == 0 and rejects == ref_rejects == []
    assert len(examples) == len(ref) == 6
    assert examples.lengths == [e.student.length for e in ref]  # expanded length from the index alone
    got = examples.get_many([4, 1])
    assert loads.calls == 2
    assert_same_example(got[0], ref[4])
    assert_same_example(got[1], ref[1])
    for i in range(len(ref)):
        assert_same_example(examples[i], ref[i])
    assert_same_example(examples[-1], ref[-1])
    with pytest.raises(IndexError):
        examples.get_many([6])
    assert examples.has_text_only == any(e.student.images is None for e in ref)
    check_iva_compatible(examples)


def test_corpus_set_equals_the_reference_and_loads_no_image_at_start(world, monkeypatch):
    enc = world.student_encoder(world.image_root)
    ref, ref_rejects = reference_join(None, enc, world.data)
    loads = CountLoads(monkeypatch)
    examples, rejects = corpus_examples(world.data, enc)
    assert loads.calls == 0 and rejects == ref_rejects
    assert examples.lengths == [e.student.length for e in ref]
    assert_same_example(examples[2], ref[2])
    assert loads.calls == 1
    assert [e.student.sample_id for e in examples.get_many(range(len(examples)))] == [e.student.sample_id for e in ref]
    with pytest.raises(AlignTIError, match="no sample has IVA signals"):
        check_iva_compatible(examples)


def test_another_vision_grid_gives_the_same_lengths(world):
    _, processor = student_model(TinySpec(text_family="qwen3", patch=16, seed=2))
    ref, _ = cache_reference(world, SampleEncoder(processor, None, 512))
    examples, _ = cache_set(world, SampleEncoder(processor, None, 512))
    assert {s[2:] for s in examples.iva_samples()} == {(16, 4)}  # (teacher, student) n_v
    assert examples.lengths == [e.student.length for e in ref]
    assert_same_example(examples[0], ref[0])
    first = examples.iva_samples()[0]
    with pytest.raises(AlignTIError, match=rf"^IVA needs .*: sample {first[0]} \(source {first[1]!r}\) has n_v=16 "
                                           r"in the cache, the student gives its image 4; use --iva-weight 0"):
        check_iva_compatible(examples)


def test_too_long_and_missing_images_are_rejects_at_start(world, tmp_path):
    ref, _ = cache_reference(world)
    longest = max(e.student.length for e in ref)
    enc = world.student_encoder(max_length=longest - 1)
    want_ex, want_rej = cache_reference(world, enc)
    examples, rejects = cache_set(world, enc)
    assert rejects == want_rej and len(rejects) >= 1 and all(r.reason == "too_long" for r in rejects)
    assert examples.lengths == [e.student.length for e in want_ex]
    rows = json.loads(open(world.data).read())
    (tmp_path / "img").mkdir()
    enc = world.student_encoder(str(tmp_path / "img"))  # an image root without the images
    examples, rejects = cache_set(world, enc)
    assert len(examples) == 0 and len(rejects) == len(rows) and {r.reason for r in rejects} == {"missing_image"}
    assert rejects == cache_reference(world, enc)[1]


def test_refusals_name_the_sample(world, tmp_path):
    other = train_tokenizer(["completely different words for another vocabulary entirely"] * 4, vocab_size=280)
    _, processor = build_tiny_llava(TinySpec(), other)
    with pytest.raises(AlignTIError, match=r"sample [0-9a-f]{32} \(source 'shapes-\d+'\): the student's token ids "
                                           r"differ from the cached teacher ids at text token \d+"):
        cache_set(world, SampleEncoder(processor, None, 512))
    rows = json.loads(open(world.data).read())
    subset = tmp_path / "subset.json"
    subset.write_text(json.dumps(rows[1:]))
    with pytest.raises(AlignTIError, match=r"1 cached sample\(s\) match no row of corpus .*e\.g\. sample [0-9a-f]{32}, "
                                           r"source 'shapes-\d+'"):
        cache_set(world, data=str(subset))
    rows[2]["conversations"][-1]["value"] += " changed"
    subset.write_text(json.dumps(rows))
    with pytest.raises(AlignTIError, match=r"1 cached sample\(s\) match no row"):
        cache_set(world, data=str(subset))


def test_an_image_changed_or_corrupt_since_extraction_is_skipped_and_named(world, tmp_path):
    import shutil

    root = tmp_path / "images"
    shutil.copytree(world.image_root, root)
    rows = json.loads(open(world.data).read())
    (root / rows[0]["image"]).write_bytes((root / rows[1]["image"]).read_bytes())  # changed
    (root / rows[2]["image"]).write_bytes(b"not an image")  # corrupt
    examples, rejects = cache_set(world, world.student_encoder(str(root)))
    assert rejects == [] and len(examples) == 6  # both need the image bytes: unknown at start
    got = examples.get_many([0, 1, 2, 3])
    assert [e.student.source_id for e in got] == [rows[1]["id"], rows[3]["id"]]
    late = examples.late_rejects
    assert sorted(late) == [0, 2] and late[0].reason == "changed_since_extraction" and late[2].reason == "corrupt_image"
    assert late[0].source_id == rows[0]["id"] and "image changed since extraction" in late[0].detail
    assert examples.get_many([0, 2]) == [] and examples.first_usable().student.source_id == rows[1]["id"]


@pytest.mark.parametrize("workers", [0, 2])
def test_training_skips_and_reports_unusable_samples(tmp_path_factory, tmp_path, capsys, workers):
    """A run whose images turn out corrupt when first used: they are skipped, named once (by the main
    process, also when loader workers found them), counted in the summary; a micro-batch left with
    no usable sample is a zero-weighted stand-in."""
    import shutil

    w = run_world(tmp_path_factory)
    root = tmp_path / "images"
    shutil.copytree(w.shapes, root)
    rows = json.loads(w.corpus.read_text())
    for row in rows[:3]:
        (root / row["image"]).write_bytes(b"broken")
    base = dict(student=str(w.student), cache=str(w.cache), image_root=str(root), recipe="alignti", lr=1e-3,
                batch_size=1, epochs=2, max_steps=30, save_every=0, progress=False, seed=7,
                num_workers=workers)
    summary = train.run_distill(distill_config(out=str(tmp_path / "run"), **base))
    assert summary["steps"] == 30 and summary["rejects"] == {"corrupt_image": 3}  # 1.25 epochs
    out = capsys.readouterr().out + capsys.readouterr().err
    assert all(out.count(f"skipping source {row['id']!r} (corrupt_image") == 1 for row in rows[:3])
    log = read_log(tmp_path / "run")
    assert sum(r["tokens"] == 0 for r in log[:24]) == 3 and all(np.isfinite(r["loss"]) for r in log)


class ReferenceSet(list):
    """The reference join in ExampleSet's interface, for the training comparison."""

    late_rejects: dict = {}

    @property
    def lengths(self) -> list[int]:
        return [e.student.length for e in self]

    @property
    def has_text_only(self) -> bool:
        return any(e.student.images is None for e in self)

    def fetch(self, indices):
        return {i: self[i] for i in indices}

    def iva_samples(self):
        return [(e.signals.sample_id, e.signals.source_id, e.signals.n_v, e.student.n_v) for e in self
                if e.signals is not None and e.signals.saliency.size]


def reference_load_examples(cfg, reader, processor):
    root = cfg.image_root or (reader.manifest.extra.get("image_root") if reader is not None else None)
    ex, rej = reference_join(reader, SampleEncoder(processor, root, cfg.max_length),
                             cfg.data or reader.manifest.extra["data"])
    return ReferenceSet(ex), rej


@pytest.mark.parametrize("source", ["cache", "corpus"])
def test_training_is_identical_to_the_reference_join(tmp_path_factory, tmp_path, monkeypatch, source):
    w = run_world(tmp_path_factory)
    if source == "cache":
        base = dict(cache=str(w.cache), recipe="alignti")
    else:
        base = dict(data=str(w.corpus), image_root=str(w.shapes), recipe="sft")
    base.update(student=str(w.student), lr=1e-3, batch_size=3, max_steps=3, save_every=0, progress=False, seed=7)
    run_set = train.run_distill(distill_config(out=str(tmp_path / "set"), **base))
    monkeypatch.setattr(train, "load_examples", reference_load_examples)
    run_ref = train.run_distill(distill_config(out=str(tmp_path / "ref"), **base))
    assert run_set["samples"] == run_ref["samples"] == 24 and run_set["steps"] == 3
    drop = {"tokens_per_second", "elapsed"}
    strip = lambda log: [{k: v for k, v in r.items() if k not in drop} for r in log]  # noqa: E731
    assert strip(read_log(tmp_path / "set")) == strip(read_log(tmp_path / "ref"))
    a, b = weights(tmp_path / "set" / "final"), weights(tmp_path / "ref" / "final")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_examples_kept_in_memory_train_identically(tmp_path_factory, tmp_path):
    w = run_world(tmp_path_factory)
    base = dict(student=str(w.student), cache=str(w.cache), recipe="alignti", lr=1e-3, batch_size=3, max_steps=20,
                save_every=0, progress=False, seed=7)  # 20 steps of 3 over 24 samples: 2.5 epochs
    train.run_distill(distill_config(out=str(tmp_path / "mem"), **base))
    train.run_distill(distill_config(out=str(tmp_path / "nomem"), example_memory_mb=0, **base))
    drop = {"tokens_per_second", "elapsed"}
    strip = lambda log: [{k: v for k, v in r.items() if k not in drop} for r in log]  # noqa: E731
    assert strip(read_log(tmp_path / "mem")) == strip(read_log(tmp_path / "nomem"))
    a, b = weights(tmp_path / "mem" / "final"), weights(tmp_path / "nomem" / "final")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_memory_budget_is_respected(world, monkeypatch):
    examples, _ = cache_set(world)
    one = memo.nbytes(examples[0])
    examples.keep_in_memory(3 * one + one // 2)
    calls = []
    build = examples._build
    monkeypatch.setattr(examples, "_build", lambda idx: calls.append(list(idx)) or build(idx))
    first = examples.get_many([0, 1, 2, 3, 4])
    assert len(examples.memo) == 3 and examples.memo.used <= 3 * one + one // 2
    again = examples.get_many([0, 1, 2, 3, 4])
    assert calls == [[0, 1, 2, 3, 4], [3, 4]]  # the kept three come from memory
    assert all(x is y for x, y in zip(first[:3], again[:3]))
    for x, y in zip(first, again):
        assert_same_example(x, y)
