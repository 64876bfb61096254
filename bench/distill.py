"""Distillation cost: step time per recipe, offline (cache) vs online (teacher in the loop), loader rate.

    python bench/distill.py [--student-hidden 256 --teacher-hidden 512 --n 64 --out bench/results/distill.json]

Builds, in a temp dir, a shapes corpus, a random teacher and student (vocab padded to --vocab so
the LM head has a realistic share) and a cache extracted with the defaults' structure; then
reports, in one run:

- KD step from cache / SFT step (target <= 1.05) and Align-TI step from cache / SFT step
  (target <= 1.30): the trainer's own step (`train.optimizer_step` + clip + AdamW) on the same
  micro-batches, recipes interleaved step by step in one process, median over steps;
- offline Align-TI step / online step, where the online step first runs the teacher over the
  batch (`HfTeacher`: plain pass + probe + candidate pass, the signals extraction stores)
  and then takes the identical student step (target: >= 2.5x faster), interleaved likewise;
- peak memory of an offline and of an online Align-TI run (target offline/online <= 0.5), each
  in its own subprocess: on GPU `torch.cuda.max_memory_allocated`; on CPU the process's peak RSS
  (VmHWM, see `peak_rss_bytes`) minus its RSS after imports (the Python + torch baseline, a few
  hundred MB, would otherwise swamp small models); both numbers are reported;
- loader rates / trainer consumption rate (target >= 20x): cache reads alone
  (`CacheReader.get_batch`), examples built the way the trainer builds them (read + student
  tokenisation + image decode + verification, `cache_examples`), and micro-batch assembly
  (`build_distill_batch`), each in samples/s, against samples/s of the Align-TI step.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from alignti.data.batching import collate
from alignti.data.corpus import read_corpus
from alignti.data.encode import SampleEncoder
from alignti.distill.batches import build_distill_batch
from alignti.distill.config import DistillConfig
from alignti.distill.config import LossConfig
from alignti.distill.examples import DistillExample, cache_examples
from alignti.distill.order import epoch_micro_batches
from alignti.distill.optim import build_optimizer, freeze
from alignti.distill.train import make_accelerator
from alignti.extract.run import ExtractConfig, run_extract
from alignti.extract.teacher import HfTeacher
from alignti.models.family import load_parts
from alignti.models.loading import load_model
from alignti.storage.reader import CacheReader
from harness import Stepper, peak_rss_bytes, rss_bytes, run_worker, sync

TARGETS = {"kd_over_sft": ("<=", 1.05), "alignti_over_sft": ("<=", 1.30), "online_over_offline_time": (">=", 2.5),
           "offline_over_online_memory": ("<=", 0.5), "cache_read_over_consumption": (">=", 20.0),
           "example_build_over_consumption": (">=", 20.0), "batch_build_over_consumption": (">=", 20.0)}


# ---------------------------------------------------------------- world (main process)


def build_world(work: Path, args: argparse.Namespace) -> None:
    from transformers import LlavaForConditionalGeneration

    from alignti.data.shapes import ShapesConfig, run_shapes
    from alignti.models.family import save_model_dir
    from alignti.models.llava import LLAVA, TinySpec, build_processor, tiny_llava_config
    from alignti.models.tokenizer import train_tokenizer

    shapes = work / "shapes"
    run_shapes(ShapesConfig(out=str(shapes), n=args.n, seed=0, image_size=64, test_fraction=0.0))
    texts = [t["value"] for r in json.loads((shapes / "train.json").read_text()) for t in r["conversations"]]
    tokenizer = train_tokenizer(texts, vocab_size=512)
    for name, hidden, layers in (("teacher", args.teacher_hidden, args.teacher_layers),
                                 ("student", args.student_hidden, args.student_layers)):
        spec = TinySpec(hidden=hidden, layers=layers, heads=8, kv_heads=4, vision_hidden=64, image_size=64, patch=8)
        config = tiny_llava_config(spec, tokenizer)
        config.text_config.vocab_size = args.vocab  # padded vocabulary: a realistic LM-head share
        torch.manual_seed(0)
        model = LlavaForConditionalGeneration(config).eval()
        save_model_dir(model, LLAVA.parts_of(build_processor(tokenizer, 64, 8)), work / name)
    run_extract(ExtractConfig(teacher=str(work / "teacher"), data=str(shapes / "train.json"), image_root=str(shapes),
                              out=str(work / "cache"), iva_layer=str(args.teacher_layers // 2), batch_size=8,
                              device="cpu"))


# ---------------------------------------------------------------- workers (subprocesses)


def worker(mode: str, work: Path, args: argparse.Namespace) -> dict:
    """mode: steps (interleaved timings) | mem-offline | mem-online (peak memory of one kind)."""
    torch.set_num_threads(args.threads)
    cfg = DistillConfig(cache=str(work / "cache"), student=str(work / "student"), out=str(work / "unused"))
    acc = make_accelerator(cfg, find_unused=False)
    # The baseline: interpreter, torch, transformers and the model classes imported, nothing loaded.
    from transformers import LlavaForConditionalGeneration, Qwen2Model, SiglipVisionModel  # noqa: F401
    base_rss = rss_bytes()
    processor = load_parts(work / "student")
    pad_id = processor.tokenizer.pad_token_id
    reader = CacheReader.open(str(work / "cache"))
    settings = reader.manifest.settings
    offline = []
    if mode != "mem-online":
        examples, _ = cache_examples(reader, SampleEncoder(processor, None, 2048), None)
        offline = examples.get_many(range(len(examples)))  # built once, outside the timings
    online = mode != "mem-offline"
    if online:
        encoder = SampleEncoder(processor, str(work / "shapes"), 2048)
        samples = [encoder.encode(r) for r in read_corpus(work / "shapes" / "train.json")]
        teacher = HfTeacher(load_model(work / "teacher", str(acc.device), torch.bfloat16 if
                                            torch.cuda.is_available() else torch.float32), settings, pad_id)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    model = load_model(work / "student", str(acc.device), torch.float32).train()
    freeze(model, "all")
    optimizer = acc.prepare(build_optimizer(model, cfg))
    image_id = model.config.image_token_id
    steppers = {r: Stepper(model, acc, r, pad_id, image_id) for r in ("sft", "kd", "alignti")}
    # breakdown of the Align-TI overhead: KD plus one of the two new terms
    steppers["kd+iva"] = Stepper(model, acc, "alignti", pad_id, image_id, tpa_weight=0.0)
    steppers["kd+tpa"] = Stepper(model, acc, "alignti", pad_id, image_id, iva_weight=0.0)
    lengths = [e.student.length for e in offline] if offline else [s.length for s in samples]
    micro = epoch_micro_batches(lengths, args.batch_size, 0, 0)
    micro = [m for m in micro if len(m) == args.batch_size][: args.warmup + args.steps]

    def online_examples(idx: list[int]) -> list:
        group = [samples[i] for i in idx]
        return [DistillExample(s, sig) for s, sig in zip(group, teacher(collate(group, pad_id)))]

    kinds = {"steps": ("sft", "kd", "kd+iva", "kd+tpa", "alignti", "online"), "mem-offline": ("alignti",),
             "mem-online": ("online",)}[mode]
    times: dict[str, list[float]] = {k: [] for k in kinds}
    for i, idx in enumerate(micro):
        for kind in kinds:  # interleaved: machine noise hits every kind alike
            sync()
            t0 = time.perf_counter()
            examples = online_examples(idx) if kind == "online" else [offline[j] for j in idx]
            steppers["alignti" if kind == "online" else kind](examples, optimizer)
            sync()
            if i >= args.warmup:
                times[kind].append(time.perf_counter() - t0)
    out = {"mode": mode, "step_seconds": {k: statistics.median(v) for k, v in times.items()},
           "peak_rss_bytes": peak_rss_bytes(), "baseline_rss_bytes": base_rss}
    out["peak_rss_above_baseline_bytes"] = out["peak_rss_bytes"] - base_rss
    if torch.cuda.is_available():
        out["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated()
    return out


def loader_rates(work: Path, batch_size: int) -> dict:
    """samples/s of cache reads, example building and micro-batch assembly (main process)."""
    reader = CacheReader.open(str(work / "cache"))
    processor = load_parts(work / "student")
    n = len(reader)
    reader.get_batch([0])  # first read of a part verifies its small files once: not a per-sample cost
    t0 = time.perf_counter()
    for start in range(0, n, batch_size):
        reader.get_batch(list(range(start, min(n, start + batch_size))))
    read = n / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    examples, _ = cache_examples(reader, SampleEncoder(processor, None, 2048), None)
    examples = examples.get_many(range(len(examples)))  # join, encode, read signals, verify
    build = len(examples) / (time.perf_counter() - t0)
    loss_cfg = LossConfig("alignti")
    t0 = time.perf_counter()
    for start in range(0, len(examples), batch_size):
        build_distill_batch(examples[start:start + batch_size], processor.tokenizer.pad_token_id,
                            processor.tokenizer.convert_tokens_to_ids("<image>"), loss_cfg, "cpu", torch.float32)
    assemble = len(examples) / (time.perf_counter() - t0)
    return {"cache_read": read, "example_build": build, "batch_build": assemble}


def report(steps: dict, mem_off: dict, mem_on: dict, rates: dict, batch_size: int) -> dict:
    t = steps["step_seconds"]
    consumption = batch_size / t["alignti"]  # samples/s the Align-TI trainer takes in
    mem_key = "cuda_max_allocated_bytes" if "cuda_max_allocated_bytes" in mem_off else "peak_rss_above_baseline_bytes"
    ratios = {
        "kd_over_sft": t["kd"] / t["sft"],
        "alignti_over_sft": t["alignti"] / t["sft"],
        "online_over_offline_time": t["online"] / t["alignti"],
        "offline_over_online_memory": mem_off[mem_key] / mem_on[mem_key],
        "cache_read_over_consumption": rates["cache_read"] / consumption,
        "example_build_over_consumption": rates["example_build"] / consumption,
        "batch_build_over_consumption": rates["batch_build"] / consumption,
    }
    return {"step_seconds": t, "consumption_samples_per_second": consumption, "loader_samples_per_second": rates,
            "memory_measure": mem_key, "memory_offline": mem_off, "memory_online": mem_on, "ratios": ratios,
            "targets": {k: {"op": op, "value": v, "met": (ratios[k] <= v if op == "<=" else ratios[k] >= v)}
                        for k, (op, v) in TARGETS.items()}}


def print_table(result: dict) -> None:
    t = result["step_seconds"]
    print("\nstep time (median, s): " + "  ".join(f"{k} {v:.4f}" for k, v in t.items()))
    print(f"Align-TI overhead over KD: IVA {t['kd+iva'] / t['kd'] - 1:+.0%}, TPA {t['kd+tpa'] / t['kd'] - 1:+.0%}")
    m = result["memory_measure"]
    print(f"peak memory ({m}): offline {result['memory_offline'][m] / 2**20:.1f} MiB, "
          f"online {result['memory_online'][m] / 2**20:.1f} MiB "
          f"(process peak RSS {result['memory_offline']['peak_rss_bytes'] / 2**20:.0f} / "
          f"{result['memory_online']['peak_rss_bytes'] / 2**20:.0f} MiB)")
    r = result["loader_samples_per_second"]
    print(f"samples/s: cache read {r['cache_read']:.0f}, example build {r['example_build']:.0f}, batch build "
          f"{r['batch_build']:.0f}; Align-TI trainer consumes {result['consumption_samples_per_second']:.1f}\n")
    print(f"{'figure':34} {'value':>9} {'target':>9}  met")
    for name, value in result["ratios"].items():
        tg = result["targets"][name]
        print(f"{name:34} {value:9.3f} {tg['op'] + str(tg['value']):>9}  {'yes' if tg['met'] else 'NO'}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--student-hidden", type=int, default=256)
    ap.add_argument("--student-layers", type=int, default=4)
    ap.add_argument("--teacher-hidden", type=int, default=512)
    ap.add_argument("--teacher-layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=2048, help="LM vocabulary rows (padded past the tokenizer)")
    ap.add_argument("--n", type=int, default=64, help="corpus samples")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps")
    ap.add_argument("--steps", type=int, default=6, help="timed steps per kind")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: stable on a shared machine; "
                    "oversubscribed OpenMP threads slow everything several-fold)")
    ap.add_argument("--out", default="bench/results/distill.json")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, Path(args.work), args)))
        return
    torch.set_num_threads(args.threads)
    passthrough = ["--batch-size", str(args.batch_size), "--warmup", str(args.warmup), "--steps", str(args.steps),
                   "--threads", str(args.threads)]
    start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        build_world(work, args)
        rates = loader_rates(work, args.batch_size)
        steps = run_worker(__file__, "steps", work, passthrough)
        mem_off = run_worker(__file__, "mem-offline", work, passthrough)
        mem_on = run_worker(__file__, "mem-online", work, passthrough)
    result = report(steps, mem_off, mem_on, rates, args.batch_size)
    result["config"] = {k: v for k, v in vars(args).items() if k not in ("worker", "work")}
    result["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    result["torch_threads"] = torch.get_num_threads()
    result["wall_seconds"] = time.time() - start
    print_table(result)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"\nwrote {args.out} ({result['wall_seconds']:.0f} s)")


if __name__ == "__main__":
    main()
