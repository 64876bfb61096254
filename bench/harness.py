"""What the benchmark scripts share: memory and time measurement, the trainer's step per recipe,
the bare teacher forwards extraction needs, worker subprocesses and the rows of a figure table.

The scripts are run as `python bench/NAME.py`, which puts this directory on sys.path, so they
import this file as `harness`.
"""

from __future__ import annotations

import ctypes
import json
import resource
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import DynamicCache

from alignti.data.batching import collate
from alignti.distill.batches import build_distill_batch
from alignti.distill.config import LossConfig
from alignti.distill.objective import Objective
from alignti.distill.train import optimizer_step
from alignti.extract.signals import propose_top
from alignti.models.ribbon import build_candidate_pass


# ---------------------------------------------------------------- memory


def rss_bytes() -> int:
    """Current resident set size (Linux /proc), bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def peak_rss_bytes() -> int:
    """Peak RSS of this process's own address space: VmHWM from /proc/self/status.

    Not `getrusage().ru_maxrss`: Linux carries the parent's RSS at fork into an exec'd child's
    ru_maxrss, so a worker started by a process that had loaded the teacher would report it too.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def reset_peak_rss() -> bool:
    """Return freed heap to the OS (glibc malloc_trim) and restart VmHWM at the current RSS, so
    the next `peak_rss_bytes()` is the peak of what runs in between (Linux >= 4.0). False where
    the kernel refuses: the peak then covers the whole process."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# ---------------------------------------------------------------- time


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, repeats: int) -> float:
    """Median seconds of `repeats` calls of fn()."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


@contextmanager
def layer_seconds(modules: Sequence[torch.nn.Module], backward: bool = False) -> Iterator[dict[str, float]]:
    """Seconds spent inside `modules` (e.g. the decoder layers), summed: out["forward"], and with
    backward=True out["backward"] (from the gradient reaching a module's output to its input's)."""
    out, start = {"forward": 0.0, "backward": 0.0}, {}

    def opened(kind: str):
        def hook(module, *_):
            sync()
            start[(kind, id(module))] = time.perf_counter()
        return hook

    def closed(kind: str):
        def hook(module, *_):
            sync()
            out[kind] += time.perf_counter() - start.pop((kind, id(module)))
        return hook

    handles = [h for m in modules for h in (m.register_forward_pre_hook(opened("forward")),
                                            m.register_forward_hook(closed("forward")))]
    if backward:
        handles += [h for m in modules for h in (m.register_full_backward_pre_hook(opened("backward")),
                                                 m.register_full_backward_hook(closed("backward")))]
    try:
        yield out
    finally:
        for h in handles:
            h.remove()


# ---------------------------------------------------------------- the steps


class Stepper:
    """The trainer's optimizer step for one recipe on a shared student."""

    def __init__(self, model, acc, recipe: str, pad_id: int, image_token_id: int, **weights: float) -> None:
        self.acc, self.model, self.pad_id, self.image_token_id = acc, model, pad_id, image_token_id
        self.loss_cfg = LossConfig(recipe, **weights)
        self.objective = Objective(model, self.loss_cfg)
        self.vocab = model.get_input_embeddings().num_embeddings

    def batch(self, examples: list):
        return build_distill_batch(examples, self.pad_id, self.image_token_id, self.loss_cfg, self.acc.device,
                                   torch.float32, vocab_size=self.vocab)

    def __call__(self, examples: list, optimizer) -> None:
        optimizer_step(self.acc, self.objective, [self.batch(examples)], [True], self.loss_cfg.weights())
        self.acc.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


@torch.inference_mode()
def bare_forwards(model, batches: list, pad_id: int, d: int) -> float:
    """Seconds for the teacher forwards extraction needs: plain pass with cache + candidate pass
    (no probe, no LM head, no writes; the candidates are chosen outside the timed regions)."""
    total = 0.0
    device, dtype = model.device, model.dtype
    for group in batches:
        batch = collate(group, pad_id).to(device, dtype)
        sync()
        t0 = time.perf_counter()
        cache = DynamicCache(config=model.config.get_text_config())
        hidden = model.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, **batch.images,
                             cache=cache, use_cache=True)[0]
        sync()
        total += time.perf_counter() - t0
        steps = [s.resp_positions for s in group]
        cands = []
        for b, s in enumerate(group):
            logits = model.lm_head(hidden[b, s.resp_positions.to(device)])
            cands.append(propose_top(logits.topk(d + 2).indices.cpu(), s.input_ids[s.resp_positions + 1], d,
                                     model.config.image_token_id))
        cp = build_candidate_pass([s.input_ids for s in group], steps, cands, batch.input_ids.shape[1], pad_id,
                                  dtype=dtype, image_token_id=model.config.image_token_id, device=device)
        sync()
        t0 = time.perf_counter()
        model.model(**cp.model_inputs(), cache=cache, use_cache=True)
        sync()
        total += time.perf_counter() - t0
    return total


def lm_layers(model) -> list[torch.nn.Module]:
    """The decoder layers of a LLaVA model."""
    return list(model.model.language_model.layers)


def tower_layers(model) -> list[torch.nn.Module]:
    """The vision tower's encoder layers of a LLaVA model (SigLIP)."""
    return list(model.model.vision_tower.encoder.layers)


# ---------------------------------------------------------------- processes and tables


def run_worker(script: str | Path, mode: str, work: Path, argv: list[str], timeout: int = 1800) -> dict:
    """Run `script --worker mode --work work *argv` and return the JSON on its last stdout line."""
    done = subprocess.run([sys.executable, str(script), "--worker", mode, "--work", str(work), *argv],
                          capture_output=True, text=True, timeout=timeout)
    if done.returncode:
        raise SystemExit(f"worker {mode} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def figure(name: str, value: float, op: str = "", target: float | None = None, note: str = "") -> dict:
    """One row of a figure table: {"figure", "value", "target" ("<= 1.05" or ""), "met" (None: no target)}."""
    met = None if target is None else bool(value <= target if op == "<=" else value >= target)
    row = {"figure": name, "value": value, "target": f"{op} {target:g}" if target is not None else "", "met": met}
    if note:
        row["note"] = note
    return row


def print_figures(rows: list[dict], width: int = 62) -> None:
    print(f"\n{'figure':<{width}}{'value':>12}  {'target':<10} met")
    for row in rows:
        met = "" if row["met"] is None else ("yes" if row["met"] else "NO")
        print(f"{row['figure']:<{width}}{row['value']:>12.4g}  {row['target']:<10} {met}")
