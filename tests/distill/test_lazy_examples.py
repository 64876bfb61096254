"""Lazy `ExampleSet` against the eager join: same examples, lengths, rejects, refusals and training
results; building it decodes no image, and using it decodes only the images asked for."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import alignti.data.corpus
import alignti.data.encode
from alignti.data.encode import SampleEncoder
from alignti.distill import memo, train
from alignti.distill.config import DistillConfig
from alignti.distill.dataset import (
    cache_examples, check_iva_compatible, corpus_examples, lazy_cache_examples, lazy_corpus_examples,
)
from alignti.errors import AlignTIError
from alignti.models.tiny import TinySpec, build_tiny_llava
from alignti.models.tokenizer import train_tokenizer
from alignti.storage.reader import CacheReader
from tests.distill.test_offline_online import make_world, student_model
from tests.distill.test_train import read_log, weights, world_of


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("lazy-world"))


def assert_same_example(a, b) -> None:
    """Every field of the student encoding and of the signals equal (tensors and arrays exactly)."""
    for name in a.student.__dataclass_fields__:
        x, y = getattr(a.student, name), getattr(b.student, name)
        if isinstance(x, torch.Tensor):
            assert torch.equal(x, y), name
        elif isinstance(x, np.ndarray):
            assert np.array_equal(x, y), name
        else:
            assert x == y, name
    assert (a.signals is None) == (b.signals is None)
    if a.signals is not None:
        for name in a.signals.__dataclass_fields__:
            x, y = getattr(a.signals, name), getattr(b.signals, name)
            assert np.array_equal(x, y) if isinstance(x, np.ndarray) else x == y, name
    assert (a.teacher_iva_layer, a.teacher_num_layers) == (b.teacher_iva_layer, b.teacher_num_layers)


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


def test_cache_set_equals_eager_join_and_loads_images_on_demand(world, monkeypatch):
    eager, eager_rejects = cache_examples(CacheReader.open(world.cache), world.student_encoder(), None)
    loads = CountLoads(monkeypatch)
    lazy, rejects = lazy_cache_examples(CacheReader.open(world.cache), world.student_encoder(), None)
    assert loads.calls == 0 and rejects == eager_rejects == []
    assert len(lazy) == len(eager) == 6
    assert lazy.lengths == [e.student.length for e in eager]  # expanded length from the index alone
    got = lazy.get_many([4, 1])
    assert loads.calls == 2
    assert_same_example(got[0], eager[4])
    assert_same_example(got[1], eager[1])
    for i in range(len(eager)):
        assert_same_example(lazy[i], eager[i])
    assert_same_example(lazy[-1], eager[-1])
    with pytest.raises(IndexError):
        lazy.get_many([6])
    assert lazy.has_text_only == any(e.student.pixel_values is None for e in eager)
    check_iva_compatible(lazy, 16)
    with pytest.raises(AlignTIError, match=r"n_v=16 per image, the student 4"):
        check_iva_compatible(lazy, 4)


def test_corpus_set_equals_eager_and_loads_no_image_at_start(world, monkeypatch):
    enc = world.student_encoder(world.image_root)
    eager, eager_rejects = corpus_examples(world.data, enc)
    loads = CountLoads(monkeypatch)
    lazy, rejects = lazy_corpus_examples(world.data, enc)
    assert loads.calls == 0 and rejects == eager_rejects
    assert lazy.lengths == [e.student.length for e in eager]
    assert_same_example(lazy[2], eager[2])
    assert loads.calls == 1
    assert [e.student.sample_id for e in lazy.get_many(range(len(lazy)))] == [e.student.sample_id for e in eager]
    with pytest.raises(AlignTIError, match="no sample has IVA signals"):
        check_iva_compatible(lazy, 16)


def test_another_vision_grid_gives_the_same_lengths(world):
    _, processor = student_model(TinySpec(text_family="qwen3", patch=16, seed=2))
    eager, _ = cache_examples(CacheReader.open(world.cache), SampleEncoder(processor, None, 512), None)
    lazy, _ = lazy_cache_examples(CacheReader.open(world.cache), SampleEncoder(processor, None, 512), None)
    assert lazy.student_n_v == 4 and lazy.lengths == [e.student.length for e in eager]
    assert_same_example(lazy[0], eager[0])
    with pytest.raises(AlignTIError, match=r"n_v=16 per image, the student 4.*--iva-weight 0"):
        check_iva_compatible(lazy, 4)


def test_too_long_and_missing_images_are_rejects_at_start(world, tmp_path):
    eager, _ = cache_examples(CacheReader.open(world.cache), world.student_encoder(), None)
    longest = max(e.student.length for e in eager)
    enc = world.student_encoder(max_length=longest - 1)
    want_ex, want_rej = cache_examples(CacheReader.open(world.cache), enc, None)
    lazy, rejects = lazy_cache_examples(CacheReader.open(world.cache), enc, None)
    assert rejects == want_rej and len(rejects) >= 1 and all(r.reason == "too_long" for r in rejects)
    assert lazy.lengths == [e.student.length for e in want_ex]
    rows = json.loads(open(world.data).read())
    (tmp_path / "img").mkdir()
    enc = world.student_encoder(str(tmp_path / "img"))  # an image root without the images
    lazy, rejects = lazy_cache_examples(CacheReader.open(world.cache), enc, None)
    assert len(lazy) == 0 and len(rejects) == len(rows) and {r.reason for r in rejects} == {"missing_image"}
    assert rejects == cache_examples(CacheReader.open(world.cache), enc, None)[1]


def test_refusals_match_the_eager_join(world, tmp_path):
    other = train_tokenizer(["completely different words for another vocabulary entirely"] * 4, vocab_size=280)
    _, processor = build_tiny_llava(TinySpec(), other)
    with pytest.raises(AlignTIError, match=r"sample [0-9a-f]{32} \(source 'shapes-\d+'\): the student's token ids "
                                           r"differ from the cached teacher ids at text token \d+"):
        lazy_cache_examples(CacheReader.open(world.cache), SampleEncoder(processor, None, 512), None)
    rows = json.loads(open(world.data).read())
    subset = tmp_path / "subset.json"
    subset.write_text(json.dumps(rows[1:]))
    with pytest.raises(AlignTIError, match=r"1 cached sample\(s\) match no row of corpus .*e\.g\. sample [0-9a-f]{32}, "
                                           r"source 'shapes-\d+'"):
        lazy_cache_examples(CacheReader.open(world.cache), world.student_encoder(), str(subset))
    rows[2]["conversations"][-1]["value"] += " changed"
    subset.write_text(json.dumps(rows))
    with pytest.raises(AlignTIError, match=r"1 cached sample\(s\) match no row"):
        lazy_cache_examples(CacheReader.open(world.cache), world.student_encoder(), str(subset))


def test_an_image_changed_since_extraction_fails_when_first_used(world, tmp_path):
    import shutil

    root = tmp_path / "images"
    shutil.copytree(world.image_root, root)
    rows = json.loads(open(world.data).read())
    victim = root / rows[0]["image"]
    other = root / rows[1]["image"]
    victim.write_bytes(other.read_bytes())
    lazy, rejects = lazy_cache_examples(CacheReader.open(world.cache), world.student_encoder(str(root)), None)
    assert rejects == [] and len(lazy) == 6  # the content hash needs the image bytes: unknown at start
    lazy[1]
    with pytest.raises(AlignTIError, match=r"sample [0-9a-f]{32} \(source 'shapes-\d+'\): the corpus row or its "
                                           r"image changed since extraction"):
        lazy[0]


class EagerSet(list):
    """The eager join in ExampleSet's interface: the reference for the training comparison."""

    @property
    def lengths(self) -> list[int]:
        return [e.student.length for e in self]

    @property
    def has_text_only(self) -> bool:
        return any(e.student.pixel_values is None for e in self)

    def get_many(self, indices):
        return [self[i] for i in indices]


def eager_load_examples(cfg, reader, processor):
    if reader is None:
        ex, rej = corpus_examples(cfg.data, SampleEncoder(processor, cfg.image_root, cfg.max_length))
    else:
        root = cfg.image_root or reader.manifest.extra.get("image_root")
        ex, rej = cache_examples(reader, SampleEncoder(processor, root, cfg.max_length), cfg.data)
    return EagerSet(ex), rej


@pytest.mark.parametrize("source", ["cache", "corpus"])
def test_training_is_identical_lazy_and_eager(tmp_path_factory, tmp_path, monkeypatch, source):
    w = world_of(tmp_path_factory)
    if source == "cache":
        base = dict(cache=str(w.cache), recipe="alignti")
    else:
        base = dict(data=str(w.corpus), image_root=str(w.shapes), recipe="sft")
    base.update(student=str(w.student), lr=1e-3, batch_size=3, max_steps=3, save_every=0, progress=False, seed=7)
    run_lazy = train.run_distill(DistillConfig(out=str(tmp_path / "lazy"), **base))
    monkeypatch.setattr(train, "load_examples", eager_load_examples)
    run_eager = train.run_distill(DistillConfig(out=str(tmp_path / "eager"), **base))
    assert run_lazy["samples"] == run_eager["samples"] == 24 and run_lazy["steps"] == 3
    drop = {"tokens_per_second", "elapsed"}
    strip = lambda log: [{k: v for k, v in r.items() if k not in drop} for r in log]  # noqa: E731
    assert strip(read_log(tmp_path / "lazy")) == strip(read_log(tmp_path / "eager"))
    a, b = weights(tmp_path / "lazy" / "final"), weights(tmp_path / "eager" / "final")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_examples_kept_in_memory_train_identically(tmp_path_factory, tmp_path):
    w = world_of(tmp_path_factory)
    base = dict(student=str(w.student), cache=str(w.cache), recipe="alignti", lr=1e-3, batch_size=3, max_steps=20,
                save_every=0, progress=False, seed=7)  # 20 steps of 3 over 24 samples: 2.5 epochs
    train.run_distill(DistillConfig(out=str(tmp_path / "mem"), **base))
    train.run_distill(DistillConfig(out=str(tmp_path / "nomem"), example_memory_mb=0, **base))
    drop = {"tokens_per_second", "elapsed"}
    strip = lambda log: [{k: v for k, v in r.items() if k not in drop} for r in log]  # noqa: E731
    assert strip(read_log(tmp_path / "mem")) == strip(read_log(tmp_path / "nomem"))
    a, b = weights(tmp_path / "mem" / "final"), weights(tmp_path / "nomem" / "final")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_memory_budget_is_respected(world, monkeypatch):
    examples, _ = lazy_cache_examples(CacheReader.open(world.cache), world.student_encoder(), None)
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
