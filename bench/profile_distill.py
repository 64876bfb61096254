"""Where a distill step's time goes, per recipe, on `distill.py`'s world (its default sizes).

    python bench/profile_distill.py [--rounds 8] [--torch-profile alignti]

One process, recipes interleaved round by round (SFT, KD, KD+IVA, KD+TPA, Align-TI, the
trainer's step as `harness.Stepper` takes it), each step split into CPU seconds
(`time.process_time`: less disturbed by other processes than wall time on a shared machine) of:
batch building (`build_distill_batch`), the decoder forward (`Objective._hidden`), the loss
terms' forward (the rest of `Objective.forward`), backward (`combine` + `backward`: the decoder's
and the loss chunks' recomputation and gradients) and the optimizer (clip + AdamW). Medians over
--rounds after two warm-up rounds. --torch-profile RECIPE adds torch.profiler's operator table for
that recipe's steps.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

import distill as bench_distill
from harness import Stepper

from alignti.data.encode import SampleEncoder
from alignti.distill.config import DistillConfig
from alignti.distill.examples import cache_examples
from alignti.distill.losses import combine
from alignti.distill.order import epoch_micro_batches
from alignti.distill.optim import build_optimizer, freeze
from alignti.distill.train import make_accelerator
from alignti.models.family import load_parts
from alignti.models.loading import load_model
from alignti.storage.reader import CacheReader

KINDS = {"sft": ("sft", {}), "kd": ("kd", {}), "kd+iva": ("alignti", {"tpa_weight": 0.0}),
         "kd+tpa": ("alignti", {"iva_weight": 0.0}), "alignti": ("alignti", {})}
PHASES = ("build", "decoder_fwd", "loss_fwd", "backward", "optimizer")


def split_step(stepper: Stepper, examples: list, optimizer) -> dict[str, float]:
    """One step of `stepper`, phase by phase (CPU seconds)."""
    clock, objective, out = time.process_time, stepper.objective, {}
    hidden = objective._hidden

    def timed_hidden(*args):
        t = clock()
        result = hidden(*args)
        out["decoder_fwd"] = clock() - t
        return result

    t = clock()
    batch = stepper.batch(examples)
    out["build"] = clock() - t
    objective._hidden = timed_hidden
    try:
        t = clock()
        terms = objective(batch)
        out["loss_fwd"] = clock() - t - out["decoder_fwd"]
    finally:
        del objective._hidden
    t = clock()
    total, _ = combine(terms, stepper.loss_cfg.weights(), batch.counts())
    total.backward()
    out["backward"] = clock() - t
    t = clock()
    stepper.acc.clip_grad_norm_([p for p in stepper.model.parameters() if p.requires_grad], 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    out["optimizer"] = clock() - t
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--torch-profile", choices=tuple(KINDS), default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    sizes = argparse.Namespace(n=64, teacher_hidden=512, teacher_layers=8, student_hidden=256, student_layers=4,
                               vocab=2048)  # distill.py's defaults
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        bench_distill.build_world(work, sizes)
        cfg = DistillConfig(cache=str(work / "cache"), student=str(work / "student"), out=str(work / "unused"))
        acc = make_accelerator(cfg, find_unused=False)
        processor = load_parts(work / "student")
        examples, _ = cache_examples(CacheReader.open(cfg.cache), SampleEncoder(processor, None, 2048), None)
        examples = examples.get_many(range(len(examples)))
        model = load_model(work / "student", "cpu", torch.float32).train()
        freeze(model, "all")
        optimizer = acc.prepare(build_optimizer(model, cfg))
        steppers = {k: Stepper(model, acc, recipe, processor.tokenizer.pad_token_id, model.config.image_token_id, **w)
                    for k, (recipe, w) in KINDS.items()}
        micro = [m for m in epoch_micro_batches([e.student.length for e in examples], 8, 0, 0) if len(m) == 8]
        seconds = {k: {p: [] for p in PHASES} for k in KINDS}
        for i in range(2 + args.rounds):
            for kind, stepper in steppers.items():
                phases = split_step(stepper, [examples[j] for j in micro[i % len(micro)]], optimizer)
                for p in PHASES if i >= 2 else ():
                    seconds[kind][p].append(phases[p])
        print(f"\nCPU ms per step (median of {args.rounds}):\n{'':10}" + "".join(f"{p:>13}" for p in PHASES)
              + f"{'total':>10}{'/ sft':>8}")
        med = {k: {p: statistics.median(v) * 1e3 for p, v in s.items()} for k, s in seconds.items()}
        sft = sum(med["sft"].values())
        for kind, m in med.items():
            print(f"{kind:10}" + "".join(f"{m[p]:13.1f}" for p in PHASES) + f"{sum(m.values()):10.1f}"
                  f"{sum(m.values()) / sft:8.3f}")
        if args.torch_profile:
            from torch.profiler import profile
            with profile() as prof:
                for i in range(4):
                    split_step(steppers[args.torch_profile], [examples[j] for j in micro[i % len(micro)]], optimizer)
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


if __name__ == "__main__":
    main()
