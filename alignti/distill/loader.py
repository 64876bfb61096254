"""The trainer's micro-batches, built ahead of the step that uses them.

The loop takes one optimizer step at a time: this process's micro-batches of the step as
(DistillBatch, live) pairs on its device (`step_batches`). Which samples form them is the plan
(`step_plan`): each epoch's micro-batch list (`order.epoch_micro_batches`, a pure function of
lengths, batch size, seed and epoch) split into steps and shared between processes
(`order.rank_share`), from the resumed step on. So the data cursor resumes exactly, and any
number of loader workers gives the same batches, bit for bit.

Windows. The plan is cut into windows of WINDOW micro-batches, each built in one go by a
`WindowBuilder`: the examples of all its samples (image decode, the student's tokenisation, the
check against the cache) with their signals in ONE batched cache read (`ExampleSet.fetch`: one
read per cache part the window touches, not one per part per micro-batch), then each micro-batch
assembled on the CPU (`build_distill_batch`, the ribbon included). With --num-workers N > 0,
windows are built in N DataLoader worker processes, PREFETCH windows ahead per worker, and
arrive in plan order; with 0, in this process when the loop reaches them. One code path either
way: the builder's `__getitem__`.

Example memory and late rejects belong to the main process. A worker keeps no examples; it sends
the ones it built back while the main process's memory has room, and the micro-batches whose
samples are all held there are assembled in the main process (later epochs of a small corpus
need no worker at all). A sample found unusable when first built (corrupt image, image changed
since extraction) comes back as a late reject and is reported once, here; a micro-batch left with
no usable sample becomes a zero-weighted stand-in (live=False), wherever it was built.
Each worker opens its own cache file handles (`ExampleSet.in_worker`). What it sends back holds
its tensors by value, as numpy arrays (`pack`): by default a tensor crosses processes as a
shared-memory segment plus one socket round trip per storage (about 1.5 ms each on a busy machine:
50 s of a 300-step demo run, measured), where a copy inside the pickle costs microseconds.
"""

from __future__ import annotations

import functools
import copyreg
import io
import pickle
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, get_worker_info
from tqdm import tqdm

from alignti.data.corpus import Reject
from alignti.distill.batches import DistillBatch, build_distill_batch, to_device
from alignti.distill.config import DistillConfig, LossConfig
from alignti.distill.examples import DistillExample, ExampleSet
from alignti.distill.order import epoch_micro_batches, rank_share, split_steps
from alignti.errors import AlignTIError

WINDOW = 8  # micro-batches built together (one cache read per part per window)
PREFETCH = 2  # windows each worker builds ahead

Planned = tuple[int, list[int], bool]  # (optimizer step, sample indices, live) of one micro-batch


def loader_workers(num_workers: int | None, device: torch.device) -> int:
    """--num-workers, or its default: 2 per process on GPU (the host idles while the GPU computes); 0 on
    CPU, where the step's threads already use every core (and workers only take them away)."""
    if num_workers is not None:
        return num_workers
    return 2 if device.type == "cuda" else 0


def step_plan(lengths: list[int], cfg: DistillConfig, per_step: int, steps_per_epoch: int, steps: range,
              rank: int, world: int, even: bool = False) -> Iterator[Planned]:
    """This process's micro-batches of `steps`, in order. even: every process runs as many per step
    (`rank_share`)."""
    plan, plan_epoch = [], -1
    for step in steps:
        epoch, in_epoch = divmod(step, steps_per_epoch)
        if epoch != plan_epoch:
            plan, plan_epoch = split_steps(epoch_micro_batches(lengths, cfg.batch_size, cfg.seed, epoch), per_step), epoch
        for idx, live in rank_share(plan[in_epoch], rank, world, even=even):
            yield step, idx, live


@dataclass(frozen=True)
class Window:
    """WINDOW consecutive planned micro-batches, as sent to a builder."""

    steps: tuple[int, ...]  # optimizer step of each micro-batch
    micro: tuple[tuple[int, ...], ...]  # its sample indices
    live: tuple[bool, ...]
    build: tuple[bool, ...]  # False: every sample is held by the main process, which assembles it
    keep: bool  # send the built examples back (the main process's example memory has room)


@dataclass
class BuiltWindow:
    """A builder's answer: the window's micro-batches on the CPU, and what the main process keeps."""

    window: Window
    batches: list[tuple[DistillBatch, bool] | None]  # (batch, live) per micro-batch; None where not built
    examples: dict[int, DistillExample] = field(default_factory=dict)  # built here (when window.keep)
    rejects: dict[int, Reject] = field(default_factory=dict)  # late rejects found here
    error: str | None = None  # an AlignTIError's message (raised again in the main process)


class WindowBuilder(Dataset):
    """window -> BuiltWindow. `assemble` turns a list of examples into a CPU DistillBatch."""

    def __init__(self, examples: ExampleSet, assemble: Callable[[list[DistillExample]], DistillBatch]) -> None:
        self.examples, self.assemble = examples, assemble

    def __getitem__(self, w: Window) -> BuiltWindow:  # type: ignore[override]
        known = set(self.examples.late_rejects)
        wanted = sorted({i for idx, b in zip(w.micro, w.build) if b for i in idx})
        try:
            found = self.examples.fetch(wanted)
            batches = [self.micro_batch(idx, on, found) if b else None for idx, on, b in zip(w.micro, w.live, w.build)]
        except AlignTIError as e:  # a user's problem (e.g. a sample that no longer lines up): one line
            return BuiltWindow(w, [], error=str(e))
        rejects = {i: r for i, r in self.examples.late_rejects.items() if i not in known}
        return BuiltWindow(w, batches, found if w.keep else {}, rejects)

    def micro_batch(self, idx: Iterable[int], live: bool, found: dict[int, DistillExample]) -> tuple[DistillBatch, bool]:
        """(batch, live) of the usable samples among `idx`; none usable: the zero-weighted stand-in."""
        examples = [found[i] for i in idx if i in found]
        if not examples:
            examples, live = [self.examples.first_usable()], False
        return self.assemble(examples), live


def window_builder(examples: ExampleSet, pad_id: int, image_token_id: int, loss_cfg: LossConfig,
                   vocab_size: int) -> WindowBuilder:
    """The builder of the trainer's micro-batches (fp32 pixels and ribbon masks: autocast is the
    objective's)."""
    assemble = functools.partial(build_distill_batch, pad_id=pad_id, image_token_id=image_token_id,
                                 loss_cfg=loss_cfg, device="cpu", dtype=torch.float32, vocab_size=vocab_size)
    return WindowBuilder(examples, assemble)


def _windows(plan: Iterator[Planned], examples: ExampleSet, workers: int) -> Iterator[Window]:
    """The plan in windows; with workers, micro-batches the main process holds entirely are marked."""
    while True:
        chunk = [m for _, m in zip(range(WINDOW), plan)]
        if not chunk:
            return
        held = [workers > 0 and all(i in examples.memo or i in examples.late_rejects for i in idx)
                for _, idx, _ in chunk]
        yield Window(tuple(s for s, _, _ in chunk), tuple(tuple(idx) for _, idx, _ in chunk),
                     tuple(on for _, _, on in chunk), tuple(not h for h in held),
                     workers > 0 and examples.memo.has_room())


def _bf16(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(array).view(torch.bfloat16)


def _reduce_tensor(t: torch.Tensor) -> tuple:
    if t.dtype == torch.bfloat16:  # no numpy dtype: its bits as int16
        return _bf16, (t.detach().view(torch.int16).numpy(),)
    return torch.from_numpy, (t.detach().numpy(),)


class _ArrayPickler(pickle.Pickler):
    """Pickles tensors by value, as numpy arrays (see the module docstring)."""

    dispatch_table = {**copyreg.dispatch_table, torch.Tensor: _reduce_tensor}


def pack(obj: Any) -> bytes:
    """`obj` as bytes, every plain tensor in it copied as an array; `pickle.loads` reverses it."""
    buf = io.BytesIO()
    _ArrayPickler(buf, protocol=pickle.HIGHEST_PROTOCOL).dump(obj)
    return buf.getvalue()


class _WorkerSide(Dataset):
    """The builder as a DataLoader worker runs it: its answers packed."""

    def __init__(self, builder: WindowBuilder) -> None:
        self.builder = builder

    def __getitem__(self, w: Window) -> bytes:  # type: ignore[override]
        return pack(self.builder[w])


def _worker_init(_: int) -> None:
    get_worker_info().dataset.builder.examples.in_worker()


def _as_is(x: bytes) -> bytes:
    return x


def _built(builder: WindowBuilder, windows: Iterator[Window], workers: int, seed: int) -> Iterator[BuiltWindow]:
    if workers == 0:
        return map(builder.__getitem__, windows)
    # Its own generator: creating the loader's iterator draws a seed, which must not come from (and
    # move) the global RNG that dropout uses.
    return map(pickle.loads, DataLoader(_WorkerSide(builder), sampler=windows, batch_size=None, num_workers=workers,
                                  collate_fn=_as_is, prefetch_factor=PREFETCH, worker_init_fn=_worker_init,
                                  generator=torch.Generator().manual_seed(seed)))


def step_batches(builder: WindowBuilder, plan: Iterator[Planned], device: torch.device, workers: int,
                 seed: int = 0) -> Iterator[tuple[int, list[tuple[DistillBatch, bool]]]]:
    """(step, [(batch on `device`, live), ...]) for each step of the plan, in order."""
    examples = builder.examples
    reported: set[int] = set()
    step, share = None, []
    for got in _built(builder, _windows(plan, examples, workers), workers, seed):
        if got.error is not None:
            raise AlignTIError(got.error)
        examples.late_rejects.update(got.rejects)
        for i in sorted(set(examples.late_rejects) - reported):
            r = examples.late_rejects[i]
            tqdm.write(f"distill: skipping source {r.source_id!r} ({r.reason}: {r.detail})")
            reported.add(i)
        for i, ex in got.examples.items():
            examples.memo.put(i, ex)
        w = got.window
        for s, idx, on, pair in zip(w.steps, w.micro, w.live, got.batches):
            if pair is None:  # held here: assembled from the example memory
                pair = builder.micro_batch(idx, on, examples.fetch(idx))
            if s != step and share:
                yield step, share
                share = []
            step = s
            share.append((to_device(pair[0], device), pair[1]))
    if share:
        yield step, share
