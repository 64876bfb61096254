"""`scale.py`'s distillation side: the worker that times and measures the steps, the streamed
epoch, and the memory extrapolation to the paper's depths."""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

import realshape
from harness import Stepper, layer_seconds, lm_layers, peak_rss_bytes, reset_peak_rss, rss_bytes, sync, tower_layers

from alignti.data.batching import collate
from alignti.data.corpus import read_corpus
from alignti.data.encode import SampleEncoder
from alignti.distill.config import DistillConfig, LossConfig
from alignti.distill.examples import DistillExample, cache_examples
from alignti.distill.kl import PADDED_MASS_WARN, padded_teacher_mass
from alignti.distill.order import epoch_micro_batches
from alignti.distill.optim import build_optimizer, freeze
from alignti.distill.train import make_accelerator, run_distill, warn_padded_mass
from alignti.extract.teacher import HfTeacher
from alignti.models.family import load_parts
from alignti.models.loading import load_model
from alignti.storage.reader import CacheReader

RECIPES = ("sft", "kd", "alignti")


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@contextmanager
def saved_bytes_per_layer(model, layers: list[torch.nn.Module]) -> Iterator[Counter]:
    """Bytes autograd saves for backward inside each of `layers` (index -> bytes), each storage
    counted once and parameters (and views of them) not at all: the activations a layer adds."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    index = {id(m): i for i, m in enumerate(layers)}
    current, seen, out = [None], set(), Counter()

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if current[0] is not None and ptr not in params and ptr not in seen:
            seen.add(ptr)
            out[current[0]] += t.untyped_storage().nbytes()
        return t

    hooks = [m.register_forward_pre_hook(lambda m, a: current.__setitem__(0, index[id(m)])) for m in layers]
    hooks += [m.register_forward_hook(lambda m, a, o: current.__setitem__(0, None)) for m in layers]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield out
    finally:
        for h in hooks:
            h.remove()


def padded_check(stepper: Stepper, examples: list) -> dict:
    """Teacher mass on ids the student's vocabulary lacks, per cached signal, and whether the
    trainer's warning fires (it must exactly when that mass exceeds PADDED_MASS_WARN)."""
    vocab, worst, rows = stepper.vocab, 0.0, {}
    for name, ids_f, lps_f in (("kd", "topk_ids", "topk_logprobs"), ("iva", "iva_topk_ids", "iva_topk_logprobs"),
                               ("tpa", "tpa_topk_ids", "tpa_topk_logprobs")):
        k = getattr(examples[0].signals, ids_f).shape[-1]
        ids = torch.from_numpy(np.concatenate([getattr(e.signals, ids_f).reshape(-1, k) for e in examples])).long()
        lps = torch.from_numpy(np.concatenate([getattr(e.signals, lps_f).reshape(-1, k) for e in examples]))
        rows[name] = float((ids >= vocab).any(-1).float().mean()) if ids.numel() else 0.0
        if ids.numel():
            worst = max(worst, float(padded_teacher_mass(ids, lps, vocab).max()))
    cands = np.concatenate([e.signals.tpa_cand_ids.reshape(-1) for e in examples])
    cand_lps = np.concatenate([e.signals.tpa_cand_logprobs.reshape(-1) for e in examples])
    batches = [stepper.batch([e]) for e in examples]
    return {"student_vocab": vocab, "max_mass": worst, "expected": worst > PADDED_MASS_WARN,
            "rows_with_padded_ids": rows,
            "tpa_candidates_padded": int((cands >= vocab).sum()), "tpa_candidates": int(cands.size),
            "tpa_padded_candidate_max_prob": float(np.exp(cand_lps[cands >= vocab]).max(initial=0.0)),
            "warned": warn_padded_mass(batches, vocab, stepper.loss_cfg.weights())}


def online_peaks(work: Path, acc, stepper: Stepper, optimizer, examples: list, base: int) -> dict:
    """Peak RSS above `base` of the online step (bf16 teacher loaded): its forward, then the student step."""
    processor = load_parts(work / "student")
    encoder = SampleEncoder(processor, str(work / "shapes"), 4096)
    by_id = {s.sample_id: s for s in (encoder.encode(r) for r in read_corpus(work / "shapes" / "long.json"))}
    reader = CacheReader.open(str(work / "cache"))
    model = load_model(work / "teacher", str(acc.device), torch.bfloat16)
    teacher = HfTeacher(model, reader.manifest.settings, processor.tokenizer.pad_token_id)
    group = [by_id[e.student.sample_id] for e in examples]
    reset_peak_rss()
    signals = teacher(collate(group, processor.tokenizer.pad_token_id))
    teacher_phase = peak_rss_bytes() - base
    reset_peak_rss()
    stepper([DistillExample(s, sig) for s, sig in zip(group, signals)], optimizer)
    student_phase = peak_rss_bytes() - base
    text = model.config.get_text_config()
    width = max(s.length for s in group) + max(e.signals.tpa_cand_ids.size for e in examples)  # plain + candidates
    kv = 2 * len(group) * width * text.num_key_value_heads * (text.hidden_size // text.num_attention_heads) * 2
    return {"teacher_phase": teacher_phase, "student_phase": student_phase, "teacher_kv_bytes_per_layer": kv,
            "teacher_layer_params": n_params(lm_layers(model)[0]),
            "teacher_tower_layer_params": n_params(tower_layers(model)[0])}


def distill_worker(work: Path, args: argparse.Namespace) -> dict:
    """Interleaved SFT / KD / Align-TI steps: median seconds and per-step peak RSS; then the online peaks."""
    cfg = DistillConfig(cache=str(work / "cache"), student=str(work / "student"), out=str(work / "unused"),
                        max_length=4096)
    acc = make_accelerator(cfg, find_unused=False)
    from transformers import LlavaForConditionalGeneration, Qwen2Model, SiglipVisionModel  # noqa: F401
    base = rss_bytes()  # interpreter, torch, transformers and the model classes; nothing loaded
    processor = load_parts(work / "student")
    examples, _ = cache_examples(CacheReader.open(str(work / "cache")), SampleEncoder(processor, None, 4096), None)
    offline = examples.get_many(range(len(examples)))
    model = load_model(work / "student", str(acc.device), torch.float32).train()
    freeze(model, "all")
    optimizer = acc.prepare(build_optimizer(model, cfg))
    steppers = {r: Stepper(model, acc, r, processor.tokenizer.pad_token_id, model.config.image_token_id)
                for r in RECIPES}
    micro = [m for m in epoch_micro_batches([e.student.length for e in offline], args.batch_size, 0, 0)
             if len(m) == args.batch_size][: args.warmup + args.steps]
    layers = lm_layers(model)
    rounds = run_rounds(steppers, [[offline[j] for j in idx] for idx in micro], optimizer, layers,
                        tower_layers(model), base, args.warmup)
    out = {"layers": args.layers, "batch_size": args.batch_size, "baseline_rss_bytes": base, **rounds,
           "student_layer_params": n_params(layers[0]),
           "student_tower_layer_params": n_params(tower_layers(model)[0]),
           "padded": padded_check(steppers["alignti"], offline)}
    out["online"] = online_peaks(work, acc, steppers["alignti"], optimizer, [offline[j] for j in micro[-1]], base)
    return out


@contextmanager
def _nothing() -> Iterator[None]:
    yield None


def run_rounds(steppers: dict, groups: list[list], optimizer, layers: list, tower: list, base: int,
               warmup: int) -> dict:
    """One step of every recipe per group, interleaved (machine noise hits every recipe alike): median
    seconds and per-step peak RSS above `base` after `warmup` rounds, the seconds inside the decoder
    layers (forward and backward) and tower layers, the ribbon's token ratio, and the activations a
    decoder layer saves (the first Align-TI step)."""
    times, peaks, decoder, vision = ({r: [] for r in RECIPES} for _ in range(4))
    tokens, activations = {"plain": 0, "ribbon": 0}, Counter()
    for i, group in enumerate(groups):
        if i >= warmup:
            ribbon = steppers["alignti"].batch(group)
            tokens["plain"] += ribbon.num_tokens
            tokens["ribbon"] += ribbon.num_tokens + int(ribbon.tpa_rows.numel())
        for recipe in RECIPES:
            measure = i == 0 and recipe == "alignti"
            reset_peak_rss()
            sync()
            t0 = time.perf_counter()
            with (saved_bytes_per_layer(steppers[recipe].model, layers) if measure else _nothing()) as saved, \
                    layer_seconds(layers, backward=True) as t_lm, layer_seconds(tower) as t_tower:
                steppers[recipe](group, optimizer)
            sync()
            activations = saved if measure else activations
            if i >= warmup:
                times[recipe].append(time.perf_counter() - t0)
                peaks[recipe].append(peak_rss_bytes() - base)
                decoder[recipe].append((t_lm["forward"] + t_lm["backward"]) / len(layers))
                vision[recipe].append(t_tower["forward"] / len(tower))  # frozen: no backward
    return {"step_seconds": {r: statistics.median(v) for r, v in times.items()},
            "peak_rss_above_baseline_bytes": {r: max(v) for r, v in peaks.items()},
            "decoder_layer_seconds": {r: statistics.median(v) for r, v in decoder.items()},
            "tower_layer_seconds": {r: statistics.median(v) for r, v in vision.items()},
            "ribbon_token_ratio": tokens["ribbon"] / tokens["plain"], "tokens": tokens,
            "student_layer_activation_bytes": max(activations.values(), default=0)}


def extrapolate_memory(d: dict) -> dict:
    """Offline and online peaks at full depth from the measured ones plus per-layer costs; the formula."""
    full, n = realshape.FULL_DEPTH, d["layers"]
    on = d["online"]
    s_layer = 16 * d["student_layer_params"] + d["student_layer_activation_bytes"]  # fp32 w + grad + 2 Adam moments
    s_layer_idle = 12 * d["student_layer_params"]  # during the teacher's forward: no grads, no activations
    tower = 4 * d["student_tower_layer_params"]  # frozen fp32 tower
    t_layer = 2 * on["teacher_layer_params"]  # bf16
    t_tower = 2 * on["teacher_tower_layer_params"]
    ds, dt, dv = full["student"] - n, full["teacher"] - n, full["tower"] - n
    offline = d["peak_rss_above_baseline_bytes"]["alignti"]
    offline_full = offline + ds * s_layer + dv * tower
    teacher_side = dt * t_layer + dv * t_tower
    online_full = max(on["teacher_phase"] + ds * s_layer_idle + dv * tower + teacher_side
                      + dt * on["teacher_kv_bytes_per_layer"],
                      on["student_phase"] + ds * s_layer + dv * tower + teacher_side)
    gb = 1e9
    formula = "\n".join([
        f"memory at full depth (measured at {n} layers; per layer: student 16 B x {d['student_layer_params']:,} "
        f"params + {d['student_layer_activation_bytes'] / gb:.3f} GB saved activations = {s_layer / gb:.3f} GB, "
        f"idle {s_layer_idle / gb:.3f} GB; student tower 4 B x params = {tower / gb:.3f} GB; teacher 2 B x "
        f"{on['teacher_layer_params']:,} = {t_layer / gb:.3f} GB + KV {on['teacher_kv_bytes_per_layer'] / gb:.3f} GB; "
        f"teacher tower {t_tower / gb:.3f} GB):",
        f"  offline = {offline / gb:.2f} + {ds} x {s_layer / gb:.3f} + {dv} x {tower / gb:.3f} "
        f"= {offline_full / gb:.2f} GB",
        f"  online  = max(teacher phase {on['teacher_phase'] / gb:.2f} + {ds} x {s_layer_idle / gb:.3f} + {dv} x "
        f"{tower / gb:.3f} + {dt} x ({t_layer / gb:.3f} + {on['teacher_kv_bytes_per_layer'] / gb:.3f}) + {dv} x "
        f"{t_tower / gb:.3f},",
        f"                student phase {on['student_phase'] / gb:.2f} + {ds} x {s_layer / gb:.3f} + {dv} x "
        f"{tower / gb:.3f} + {dt} x {t_layer / gb:.3f} + {dv} x {t_tower / gb:.3f}) = {online_full / gb:.2f} GB",
        f"  offline / online = {offline_full / online_full:.3f}"])
    return {"offline_full": offline_full, "online_full": online_full, "full_ratio": offline_full / online_full,
            "measured_ratio": offline / max(on["teacher_phase"], on["student_phase"]), "formula": formula}


def stream_epochs(work: Path, args: argparse.Namespace) -> dict:
    """`run_distill` over two epochs: step seconds of the first (examples built as the loop reaches
    them, in loader workers where the trainer has --num-workers) over the second (from memory)."""
    fields = {f.name for f in dataclasses.fields(DistillConfig)}
    workers = {"num_workers": args.num_workers} if "num_workers" in fields else {}
    cfg = DistillConfig(cache=str(work / "cache"), student=str(work / "student"), out=str(work / "stream"),
                        loss=LossConfig("sft"), train="projector", epochs=2, batch_size=args.batch_size,
                        max_steps=-(-args.samples // args.batch_size) + 3, save_every=0, progress=False,
                        max_length=4096, example_memory_mb=4096, **workers)
    run_distill(cfg)
    log = [json.loads(line) for line in (work / "stream" / "log.jsonl").read_text().splitlines() if line]
    seconds = {e: [r["tokens"] / r["tokens_per_second"] for r in log if r["epoch"] == e] for e in (0, 1)}
    first = seconds[0][1:] or seconds[0]  # the run's first step also warms up allocations
    ratio = statistics.median(first) / statistics.median(seconds[1])
    note = (f"--num-workers {args.num_workers}" if workers else
            "the trainer has no --num-workers yet: examples built in the main process") + \
        f"; recipe sft, --train projector, {len(log)} steps"
    return {"epoch_step_seconds": seconds, "ratio": ratio, "num_workers": workers.get("num_workers"), "note": note}
