"""`alignti distill`: train a student from the teacher-signal cache (or from a corpus, SFT only).

`run_distill` reads top to bottom as the whole run: check the output directory, load the
student, open the cache and check the student against it, build the examples, freeze, set up
AdamW + cosine schedule on `accelerate`, then the loop. Each optimizer step:

1. take the step's micro-batches (the same for any number of processes: the epoch's
   length-grouped micro-batch list depends only on seed, epoch and --batch-size) and this
   process's share of them;
2. add up their loss counts (known before any forward) over micro-batches and processes;
3. per micro-batch: loss = combine(terms, weights, global counts) * processes, backward
   (gradient sync only on the last one); DDP averages over processes, so the gradient is exactly
   that of the global mean, however the samples are split;
4. clip, step, schedule, log; checkpoint every --save-every steps.

The same script runs unchanged under `accelerate launch --num_processes N` (DDP, gloo on CPU),
and with an FSDP accelerate config shards the student itself (`sharding.py`). The micro-batches
are built ahead, in --num-workers DataLoader workers (`loader.py`).
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, DistributedDataParallelKwargs
from accelerate.utils import set_seed
from tqdm import tqdm

from alignti.data.encode import SampleEncoder
from alignti.distill import checkpoint as ckpt
from alignti.distill import sharding
from alignti.distill import trackers
from alignti.distill.config import TERMS, DistillConfig, LossConfig
from alignti.distill.examples import ExampleSet, cache_examples, check_iva_compatible, corpus_examples
from alignti.distill.kl import PADDED_MASS_WARN
from alignti.distill.loader import loader_workers, step_batches, step_plan, window_builder
from alignti.distill.losses import combine
from alignti.distill.objective import Objective, padded_mass_warning, probe_layers
from alignti.distill.optim import build_optimizer, build_scheduler, freeze
from alignti.distill.plot import plot_log
from alignti.cliargs import options, write_run_file
from alignti.errors import AlignTIError
from alignti.models.family import ModelParts, load_parts
from alignti.models.fingerprint import fingerprint_model_dir
from alignti.models.loading import load_model, resolve_device
from alignti.progress import progress_bar
from alignti.storage.files import write_errors
from alignti.storage.reader import CacheReader


# ---------------------------------------------------------------- setup


def make_accelerator(cfg: DistillConfig, find_unused: bool) -> Accelerator:
    """Accelerator for --device. find_unused: some micro-batch may leave parameters out of the
    graph (a text-only sample skips the projector); DDP must then be told, or it waits for their
    gradients forever. It costs a graph traversal per step, so it is on only when needed.
    Mixed precision is ours (`Objective`), not accelerate's; --report-to picks accelerate's tracker."""
    device = resolve_device(cfg.device)
    ddp = DistributedDataParallelKwargs(find_unused_parameters=find_unused)
    return Accelerator(cpu=device == "cpu", mixed_precision="no", kwargs_handlers=[ddp],
                       log_with=trackers.log_with(cfg.report_to), project_dir=cfg.out)


def autocast_dtype(cfg: DistillConfig, device: torch.device) -> torch.dtype | None:
    """bf16 autocast (fp32 master weights) for --dtype bf16, and for auto on GPU; None = fp32."""
    if cfg.dtype == "bf16" or (cfg.dtype == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def open_cache(cfg: DistillConfig, student_fp: dict) -> CacheReader | None:
    if cfg.cache is None:
        return None
    reader = CacheReader.open(cfg.cache)
    reader.check_student(student_fp)
    return reader


def load_examples(cfg: DistillConfig, reader: CacheReader | None, parts: ModelParts) -> tuple[ExampleSet, list]:
    """(examples, rejects): cached samples joined with the student's encoding, or a corpus; lazy
    (each micro-batch is encoded and its signals read when the loop reaches it)."""
    encoder = SampleEncoder(parts, cfg.image_root, cfg.max_length)
    examples, rejects = corpus_examples(cfg.data, encoder) if reader is None else cache_examples(reader, encoder,
                                                                                                 cfg.data)
    examples.keep_in_memory(cfg.example_memory_mb * 2**20)
    return examples, rejects


# ---------------------------------------------------------------- one optimizer step


def optimizer_step(acc: Accelerator, objective: torch.nn.Module, batches: list, live: list[bool],
                   weights: dict[str, float], sync_each: bool = False) -> dict[str, torch.Tensor]:
    """Forward + backward over this process's micro-batches; returns this process's shares of
    each term's global mean (they add up over processes to the global means). sync_each: reduce
    gradients after every micro-batch (FSDP), not only after the last (DDP's no_sync)."""
    counts = torch.zeros(len(TERMS), dtype=torch.float64, device=acc.device)
    for b, on in zip(batches, live):
        if on:
            c = b.counts()
            counts += torch.tensor([float(c.get(n, 0.0)) for n in TERMS], dtype=torch.float64, device=acc.device)
    counts = acc.reduce(counts, reduction="sum") if acc.num_processes > 1 else counts
    global_counts = {n: float(v) for n, v in zip(TERMS, counts.tolist())}
    shares: dict[str, torch.Tensor] = {}
    for j, (b, on) in enumerate(zip(batches, live)):
        sync = sync_each or j == len(batches) - 1
        with contextlib.nullcontext() if sync else acc.no_sync(objective):
            terms = objective(b)
            total, means = combine(terms, weights, global_counts)
            acc.backward(total * (acc.num_processes if on else 0.0))
        if on:
            for n, m in means.items():
                shares[n] = shares.get(n, 0.0) + m.float()
    return shares


def step_record(acc: Accelerator, shares: dict[str, torch.Tensor], weights: dict[str, float], tokens: int,
                extra: dict[str, Any]) -> dict[str, Any]:
    """Global per-term means, weighted total and tokens of one step (one all-reduce)."""
    vec = torch.tensor([float(shares.get(n, 0.0)) for n in TERMS] + [float(tokens)], dtype=torch.float64,
                       device=acc.device)
    vec = acc.reduce(vec, reduction="sum") if acc.num_processes > 1 else vec
    values = dict(zip(TERMS, vec[:-1].tolist()))
    terms = {n: values[n] for n in TERMS if n in shares or weights.get(n, 0.0) != 0}
    record = dict(extra)
    record["loss"] = sum(weights.get(n, 0.0) * v for n, v in terms.items())
    record.update(terms)
    record["tokens"] = int(vec[-1].item())
    return record


def _postfix(record: dict[str, Any]) -> dict[str, str]:
    shown = {n: f"{record[n]:.4f}" for n in ("loss",) + TERMS if n in record}
    shown["tok/s"] = f"{record['tokens_per_second']:.0f}"
    return shown


# ---------------------------------------------------------------- the run


@dataclass
class Run:
    """Everything the loop needs, built and validated by `setup_run`."""

    cfg: DistillConfig
    acc: Accelerator
    loss_cfg: LossConfig
    weights: dict[str, float]
    student_fp: dict
    parts: ModelParts  # the student's tokenizer, image processor, template (saved with the final model)
    examples: ExampleSet  # built a window of micro-batches at a time (loader.py), never all at once
    rejects: list
    model: torch.nn.Module  # the student itself (not DDP-wrapped; under FSDP its layers are sharded)
    objective: torch.nn.Module  # student + loss terms: DDP-wrapped under several processes, or the FSDP root
    optimizer: Any
    scheduler: Any
    per_step: int  # micro-batches per optimizer step, all processes together
    steps_per_epoch: int
    total_steps: int
    start_step: int = 0
    prior_seconds: float = 0.0  # training time before the resumed checkpoint
    resume_from: Path | None = None
    fsdp: bool = False


def run_distill(cfg: DistillConfig) -> dict[str, Any] | None:
    """Train the student; returns a summary (steps, last losses, tokens/s, wall time, paths) on the
    main process, None on the others."""
    wall_start = time.time()
    with contextlib.ExitStack() as held:  # the output directory's lock, released however the run ends
        run = setup_run(cfg, held)
        acc = run.acc
        last, train_seconds = train_loop(run)
        acc.wait_for_everyone()
        final = Path(cfg.out) / ckpt.FINAL
        full = sharding.full_model_state(run.model) if run.fsdp else None  # collective
        if acc.is_main_process:
            model = sharding.unsharded_copy(cfg.student, full) if run.fsdp else run.model
            final = ckpt.save_final(model, run.parts, cfg.out, ckpt.saved_dtype(cfg.student))
            plot_log(cfg.out)
        acc.wait_for_everyone()
        acc.end_training()  # closes the tracker run
    return _summary(run, final, last, train_seconds, time.time() - wall_start) if acc.is_main_process else None


def load_student(cfg: DistillConfig, acc: Accelerator, resume_from: Path | None) -> tuple[torch.nn.Module, list[str]]:
    """The student in fp32 (master weights) on this process's device, frozen per --train."""
    set_seed(cfg.seed)
    model = load_model(cfg.student, str(acc.device), torch.float32).train()
    trainable = freeze(model, cfg.train)
    if cfg.gradient_checkpointing:
        # Non-reentrant: works with frozen inputs (--train projector) and with DDP's hooks.
        enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5.2x
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if resume_from:
        ckpt.load_trainable(resume_from, model)
    return model, trainable


def setup_run(cfg: DistillConfig, held: contextlib.ExitStack) -> Run:
    """Validate everything, load examples + student, build the optimizer; write nothing until all passed.
    The main process locks --out (into `held`) before it deletes or writes anything there."""
    fsdp = sharding.launch_sharding()
    loss_cfg = cfg.loss
    weights = loss_cfg.weights()
    ckpt.check_output_dir(cfg.out, cfg.resume, cfg.overwrite)
    student_fp = fingerprint_model_dir(cfg.student)
    reader = open_cache(cfg, student_fp)
    teacher = reader.manifest if reader is not None else None
    layers = probe_layers(loss_cfg, student_fp["num_hidden_layers"], teacher and teacher.settings.iva_layer,
                          teacher and teacher.teacher_fingerprint.get("num_hidden_layers"))
    parts = load_parts(cfg.student)
    examples, rejects = load_examples(cfg, reader, parts)
    if not examples:
        raise AlignTIError(f"no usable samples ({len(rejects)} rejected)")
    if weights["iva"] > 0:
        check_iva_compatible(examples)
    acc = make_accelerator(cfg, find_unused=examples.has_text_only)
    if acc.is_main_process:
        held.enter_context(ckpt.lock_output_dir(cfg.out))
        ckpt.check_output_dir(cfg.out, cfg.resume, cfg.overwrite)  # again: a run may have ended since the first check
    acc.wait_for_everyone()  # every process has checked --out before the main one writes into it
    per_step = cfg.grad_accum * acc.num_processes
    resume_from = ckpt.latest_checkpoint(cfg.out) if cfg.resume else None
    state = (ckpt.check_resume(cfg, resume_from, per_step, student_fp["weights"], fsdp is not None)
             if resume_from else {})
    model, trainable = load_student(cfg, acc, resume_from)

    steps_per_epoch = math.ceil(math.ceil(len(examples) / cfg.batch_size) / per_step)
    total_steps = min(steps_per_epoch * cfg.epochs, cfg.max_steps or steps_per_epoch * cfg.epochs)
    objective = Objective(model, loss_cfg, *layers, autocast=autocast_dtype(cfg, acc.device))
    if fsdp is not None:  # sharded before the optimizer exists: its parameters become DTensors
        sharding.shard(objective, model, fsdp, unused_parameters=examples.has_text_only)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, total_steps)
    if fsdp is None:
        objective, optimizer = acc.prepare(objective, optimizer)
    run = Run(cfg, acc, loss_cfg, weights, student_fp, parts, examples, rejects, model, objective, optimizer,
              scheduler, per_step, steps_per_epoch, total_steps, int(state.get("step", 0)),
              float(state.get("train_seconds", 0.0)), resume_from, fsdp is not None)
    if resume_from:
        restore_state(run, state)
    if acc.is_main_process:
        if not resume_from:
            ckpt.start_output_dir(cfg.out, cfg.overwrite, {"config": options(cfg), "student": student_fp,
                                                           "run_id": trackers.new_run_id()})
        write_run_file(cfg, Path(cfg.out) / ckpt.RUN_FILE, "distill", note="the *_weight values are --recipe's, "
                       "resolved: delete them to take another recipe's")
        ckpt.truncate_log(cfg.out, run.start_step)
        trackers.start(acc, cfg.report_to, cfg.out, options(cfg), run.start_step)
        print(_intro(run, trainable), flush=True)
    acc.wait_for_everyone()
    return run


def restore_state(run: Run, state: dict[str, Any]) -> None:
    """Optimizer, schedule and this process's RNG from the checkpoint being resumed."""
    load = (functools.partial(sharding.load_full_optimizer_state, run.objective, run.optimizer) if run.fsdp
            else run.optimizer.load_state_dict)
    ckpt.load_optimizer_state(run.resume_from, load, run.scheduler)
    if not ckpt.load_rank_rng(run.resume_from, run.acc.process_index):
        print(f"distill: process {run.acc.process_index}: no RNG state in {run.resume_from} (written by "
              f"{state.get('processes')} processes); random draws (dropout) continue from --seed", flush=True)


def train_loop(run: Run) -> tuple[dict[str, Any], float]:
    """The optimizer steps from run.start_step to run.total_steps; (last step's record, train seconds)."""
    cfg, acc = run.cfg, run.acc
    main = acc.is_main_process
    vocab = run.model.get_input_embeddings().num_embeddings
    builder = window_builder(run.examples, run.parts.tokenizer.pad_token_id, run.model.config.image_token_id,
                             run.loss_cfg, vocab)
    plan = step_plan(run.examples.lengths, cfg, run.per_step, run.steps_per_epoch,
                     range(run.start_step, run.total_steps), acc.process_index, acc.num_processes, even=run.fsdp)
    params = [p for p in run.model.parameters() if p.requires_grad]
    last, warned = {}, False
    bar = progress_bar(total=run.total_steps, initial=run.start_step, desc="distill", unit="step",
                       disable=not (main and cfg.progress))
    log = open(Path(cfg.out) / ckpt.LOG, "a", encoding="utf-8") if main else None
    loop_start = t0 = time.time()  # t0: the step's start, waiting for its micro-batches included
    for step, share in step_batches(builder, plan, acc.device, loader_workers(cfg.num_workers, acc.device), cfg.seed):
        epoch = step // run.steps_per_epoch
        batches = [b for b, _ in share]
        warned = warned or warn_padded_mass(batches, vocab, run.weights)
        lr = run.optimizer.param_groups[0]["lr"]
        shares = optimizer_step(acc, run.objective, batches, [on for _, on in share], run.weights, sync_each=run.fsdp)
        grad_norm = acc.clip_grad_norm_(params, cfg.max_grad_norm) if cfg.max_grad_norm > 0 else None
        run.optimizer.step()
        run.scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
        tokens = sum(b.num_tokens for b, on in share if on)
        last = step_record(acc, shares, run.weights, tokens, {"step": step + 1, "epoch": epoch, "lr": lr})
        if not math.isfinite(last["loss"]):  # same value on every process: all stop together
            terms = {n: last[n] for n in TERMS if n in last}
            raise AlignTIError(f"step {step + 1}: the loss is {last['loss']} (terms {terms}); lower --lr, or "
                               f"resume from the last checkpoint")
        elapsed = run.prior_seconds + time.time() - loop_start
        last.update(grad_norm=None if grad_norm is None else float(sharding.as_local(grad_norm)),
                    tokens_per_second=last["tokens"] / max(time.time() - t0, 1e-9), elapsed=elapsed)
        if main:
            with write_errors("the training log", log.name):
                log.write(json.dumps(last) + "\n")
                log.flush()
            trackers.log_step(acc, last)
            if (step + 1) % cfg.log_every == 0 or step + 1 == run.total_steps:
                bar.set_postfix(_postfix(last), refresh=False)
            bar.update(1)
        if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < run.total_steps:
            save_checkpoint(run, step + 1, elapsed)
        t0 = time.time()
    bar.close()
    if log is not None:
        log.close()
    return last, run.prior_seconds + time.time() - loop_start


def warn_padded_mass(batches: list, vocab_size: int, weights: dict[str, float]) -> bool:
    """Warn (once: returns True when it did) if teacher ids beyond the student vocab carry mass."""
    if weights["kd"] + weights["iva"] + weights["tpa"] == 0:
        return False
    mass = max(padded_mass_warning(b, vocab_size) for b in batches)
    if mass <= PADDED_MASS_WARN:
        return False
    tqdm.write(f"warning: teacher ids beyond the student vocabulary ({vocab_size}) carry up to {mass:.2e} "
               f"probability in a row; that mass goes to the tail bucket")
    return True

def save_checkpoint(run: Run, step: int, train_seconds: float) -> None:
    """Checkpoint after `step` (collective: every process must call it)."""
    epoch, in_epoch = divmod(step, run.steps_per_epoch)
    state = {"step": step, "epoch": epoch, "step_in_epoch": in_epoch, "micro_batches_per_step": run.per_step,
             "processes": run.acc.num_processes, "fsdp": run.fsdp, "config": options(run.cfg),
             "student_weights": run.student_fp["weights"], "train_seconds": train_seconds}
    if run.fsdp:  # gathered by every process, held by the main one
        trainable = {n for n, p in run.model.named_parameters() if p.requires_grad}
        weights = {n: t for n, t in sharding.full_model_state(run.model).items() if n in trainable}
        optimizer_state = sharding.full_optimizer_state(run.objective, run.optimizer)
    elif run.acc.is_main_process:
        weights, optimizer_state = ckpt.trainable_state(run.model), run.optimizer.state_dict()
    else:
        weights, optimizer_state = {}, {}
    ckpt.save_checkpoint(run.acc, run.cfg.out, weights, optimizer_state, run.scheduler, state,
                         run.cfg.keep_checkpoints)


def _intro(run: Run, trainable: list[str]) -> str:
    n_train = sum(p.numel() for p in run.model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in run.model.parameters())
    reasons = ", ".join(f"{k} {v}" for k, v in sorted(Counter(r.reason for r in run.rejects).items()))
    line = (f"distill: {len(run.examples)} samples ({len(run.rejects)} rejected{': ' + reasons if reasons else ''}); "
            f"{n_train:,} of {n_all:,} parameters train ({len(trainable)} tensors, --train {run.cfg.train}); "
            f"{run.total_steps} steps of {run.per_step * run.cfg.batch_size} samples on {run.acc.num_processes} "
            f"process(es)")
    return line + (f"\ndistill: resuming from {run.resume_from}" if run.resume_from else "")


def _summary(run: Run, final: Path, last: dict, train_seconds: float, wall: float) -> dict[str, Any]:
    log_path = Path(run.cfg.out) / ckpt.LOG
    tokens = 0
    if log_path.is_file():
        tokens = sum(json.loads(line)["tokens"] for line in log_path.read_text(encoding="utf-8").splitlines() if line)
    return {
        "out": run.cfg.out, "final": str(final), "log": str(log_path), "steps": run.total_steps,
        "steps_this_run": run.total_steps - run.start_step,
        "resumed_from": str(run.resume_from) if run.resume_from else None, "samples": len(run.examples),
        "rejects": dict(Counter(r.reason for r in [*run.rejects, *run.examples.late_rejects.values()])),
        "processes": run.acc.num_processes,
        "final_losses": {k: last[k] for k in ("loss",) + TERMS if k in last},
        "tokens": tokens, "tokens_per_second": round(tokens / max(train_seconds, 1e-9), 1),
        "train_seconds": round(train_seconds, 3), "wall_seconds": round(wall, 3),
    }
