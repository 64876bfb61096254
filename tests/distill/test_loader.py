"""The loader (`distill/loader.py`): micro-batches built in DataLoader workers train exactly like ones
built in the training process; a window of micro-batches reads each cache part once; the example
memory and late rejects stay in the main process."""

from __future__ import annotations

import pytest
import torch

from alignti.distill import loader, memo, train
from alignti.distill.config import LossConfig
from alignti.distill.examples import cache_examples
from alignti.storage.reader import CacheReader
from tests.distill.worlds import distill_config, make_signal_world, read_log, run_world, weights

TIMING = {"tokens_per_second", "elapsed"}


def strip_timing(log: list[dict]) -> list[dict]:
    return [{k: v for k, v in rec.items() if k not in TIMING} for rec in log]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_signal_world(tmp_path_factory.mktemp("loader-world"))  # 6 samples in two cache parts


def example_set(world, memory_bytes: int = 0):
    examples, _ = cache_examples(CacheReader.open(world.cache), world.student_encoder(world.image_root), world.data)
    examples.keep_in_memory(memory_bytes)
    return examples


def builder_of(world, examples):
    return loader.window_builder(examples, world.pad_id, world.image_token_id, LossConfig(),
                                 world.student.get_input_embeddings().num_embeddings)


def plan_of(examples, steps: range, batch_size: int = 1):
    cfg = distill_config(cache="c", student="s", out="o", batch_size=batch_size, seed=3)
    per_epoch = -(-len(examples) // batch_size)
    return loader.step_plan(examples.lengths, cfg, 1, per_epoch, steps, 0, 1)


def assert_same_batches(a, b) -> None:
    assert [s for s, _ in a] == [s for s, _ in b]
    for (_, share_a), (_, share_b) in zip(a, b):
        assert [on for _, on in share_a] == [on for _, on in share_b]
        for (x, _), (y, _) in zip(share_a, share_b):
            for name in x.__dataclass_fields__:
                u, v = getattr(x, name), getattr(y, name)
                if isinstance(u, torch.Tensor):
                    assert torch.equal(u, v), name
                elif isinstance(u, tuple) and u and isinstance(u[0], torch.Tensor):
                    assert all(torch.equal(p, q) for p, q in zip(u, v, strict=True)), name
                elif isinstance(u, dict):  # the image inputs (tensors), the term counts (floats)
                    assert u.keys() == v.keys(), name
                    assert all(torch.equal(u[k], v[k]) if isinstance(u[k], torch.Tensor) else u[k] == v[k]
                               for k in u), name
                else:
                    assert u == v, name


def test_a_window_reads_each_part_once(world, monkeypatch):
    examples = example_set(world)
    assert len(examples) == 6 and len(examples.reader.parts) == 2
    reads, windows = [], []
    real_read, real_build = CacheReader._read_part, loader.WindowBuilder.__getitem__

    def read_part(self, pi, indices):
        reads[-1].append(pi)
        return real_read(self, pi, indices)

    def build(self, w):
        reads.append([])
        windows.append(w)
        return real_build(self, w)

    monkeypatch.setattr(CacheReader, "_read_part", read_part)
    monkeypatch.setattr(loader.WindowBuilder, "__getitem__", build)
    got = list(loader.step_batches(builder_of(world, examples), plan_of(examples, range(12)), torch.device("cpu"), 0))
    assert len(got) == 12 and [len(w.micro) for w in windows] == [loader.WINDOW, 12 - loader.WINDOW]
    for w, parts in zip(windows, reads):
        samples = examples._cache_index[sorted({i for idx in w.micro for i in idx})]
        assert parts == sorted(set(examples.reader._part[samples].tolist()))  # each part once per window
    # one micro-batch (one sample) per step: read micro-batch by micro-batch, that would be 12 reads
    assert sum(map(len, reads)) == 4


def test_workers_build_the_same_batches_and_fill_the_main_memory(world):
    steps = range(15)  # 2.5 epochs of 6 one-sample micro-batches: windows hold repeats and held samples
    ref = list(loader.step_batches(builder_of(world, example_set(world)), plan_of(example_set(world), steps),
                                   torch.device("cpu"), 0))
    one = memo.nbytes(example_set(world).get_many([0])[0])
    examples = example_set(world, memory_bytes=3 * one)  # room for about three: some held, some rebuilt
    examples.get_many([0, 1])  # held before the loader starts
    got = list(loader.step_batches(builder_of(world, examples), plan_of(examples, steps), torch.device("cpu"), 2))
    assert_same_batches(got, ref)
    assert 2 <= len(examples.memo) <= 3 and examples.memo.used <= 3 * one  # the workers' examples came back


@pytest.mark.timeout(400)
@pytest.mark.parametrize("memory_mb", [512, 0])
def test_training_with_workers_equals_training_without(tmp_path_factory, tmp_path, memory_mb):
    w = run_world(tmp_path_factory)
    base = dict(student=str(w.student), cache=str(w.cache), recipe="alignti", lr=1e-3, batch_size=3, max_steps=20,
                save_every=0, progress=False, seed=7, example_memory_mb=memory_mb)  # 2.5 epochs
    train.run_distill(distill_config(out=str(tmp_path / "w0"), num_workers=0, **base))
    train.run_distill(distill_config(out=str(tmp_path / "w2"), num_workers=2, **base))
    assert strip_timing(read_log(tmp_path / "w0")) == strip_timing(read_log(tmp_path / "w2"))
    a, b = weights(tmp_path / "w0" / "final"), weights(tmp_path / "w2" / "final")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
