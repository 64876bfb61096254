"""The pipeline at real widths (random weights, reduced depth) on CPU: extract, distill, memory.

    python bench/scale.py [--layers 2 --samples 8 --threads 1 --out bench/results/scale.json]
    python bench/scale.py --quick        # small widths: checks the script runs (figures meaningless)

The world is `realshape.py`'s (Qwen2.5-7B teacher and 0.5B student widths, SigLIP-so400m tower,
~900-token samples with 729 vision tokens), every model cut to --layers decoder and tower layers.
Reports, in one run, as `figures` rows (figure, value, target, met) like `run_all.py`:

- extract (teacher in --extract-dtype): seconds per sample; extract loop / the bare teacher
  forwards it needs (`harness.bare_forwards`), measured and extrapolated to full depth (the
  seconds inside the decoder and tower layers are timed and scaled to 28 and 27 layers); cache
  bytes per sample and per response token by signal; the padded-vocabulary check: the teacher
  head has 152,064 rows, the student 151,936, and a random head puts mass on the 128 extra ids;
  the cache must show it and the trainer's warning (`train.warn_padded_mass`) must fire exactly
  when that mass exceeds `kl.PADDED_MASS_WARN` (a trained Qwen head leaves those rows untrained,
  with ~0 mass, and then must not warn);
- distill, fp32 on CPU, in one worker process: SFT, KD and Align-TI steps interleaved (the
  trainer's own step, `harness.Stepper`), median time and peak RSS of each (the peak of that
  step alone: `harness.reset_peak_rss` before it); KD / SFT (<= 1.05); Align-TI / SFT against
  1.05 x the ribbon's token ratio (the tokens the student's decoder processes with and without
  the candidates); Align-TI / SFT peak memory (<= 1.15);
- the first epoch streamed (examples built as the loop reaches them, with --num-workers where the
  trainer has that option) against the second, from the example memory: `run_distill` itself,
  step times from its log (<= 1.03);
- offline / online peak memory at the paper's sizes (<= 0.5): the offline Align-TI step, and the
  online one (bf16 teacher in the same process, its forward then the student step), measured at
  --layers and extrapolated to 24 student, 28 teacher and 27 tower layers with per-layer costs
  measured here (parameter counts; saved activations per student layer; the teacher's KV cache):
  see `extrapolate_memory`, whose formula is printed.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import tempfile
import time
from pathlib import Path

import torch

import realshape
from harness import bare_forwards, figure, layer_seconds, lm_layers, print_figures, run_worker, tower_layers
from scale_distill import distill_worker, extrapolate_memory, stream_epochs

from alignti.data.batching import length_grouped
from alignti.data.corpus import read_corpus
from alignti.data.encode import SampleEncoder
from alignti.extract.run import ExtractConfig, run_extract
from alignti.models.family import load_parts
from alignti.models.loading import DTYPES, load_model
from alignti.storage.reader import CacheReader
from alignti.storage.stats import signal_bytes


def extract_part(work: Path, args: argparse.Namespace) -> dict:
    """Bare teacher forwards (per-layer seconds timed), then `run_extract` over the same corpus."""
    dtype = DTYPES[args.extract_dtype]
    teacher_dir, corpus = work / "teacher", work / "shapes" / "long.json"
    cfg = ExtractConfig(teacher=str(teacher_dir), data=str(corpus), image_root=str(work / "shapes"),
                        out=str(work / "cache"), iva_layer=str(args.layers // 2), batch_size=args.extract_batch,
                        device="cpu", dtype=args.extract_dtype, max_length=4096)
    model, processor = load_model(teacher_dir, "cpu", dtype), load_parts(teacher_dir)
    pad_id = processor.tokenizer.pad_token_id
    encoder = SampleEncoder(processor, cfg.image_root, cfg.max_length)
    batches = list(length_grouped((encoder.encode(r) for r in read_corpus(corpus)), cfg.batch_size))
    bare_forwards(model, batches[:1], pad_id, cfg.tpa_d)  # warm-up
    with layer_seconds(lm_layers(model)) as t_lm, layer_seconds(tower_layers(model)) as t_tower:
        bare = bare_forwards(model, batches, pad_id, cfg.tpa_d)
    del model
    gc.collect()
    summary = run_extract(cfg)
    reader = CacheReader.open(cfg.out)
    per_signal, total = signal_bytes(reader)
    return {"bare_seconds": bare, "lm_layer_seconds": t_lm["forward"] / args.layers, "tower_layer_seconds":
            t_tower["forward"] / args.layers, "loop_seconds": summary["loop_seconds"], "samples": summary["samples_written"],
            "bytes_per_response_token": summary["bytes_per_response_token_by_signal"] | {
                "total": summary["bytes_per_response_token"]},
            "bytes_per_sample": {k: v / len(reader) for k, v in per_signal.items()} | {"total": total / len(reader)},
            "response_tokens": reader.num_response_tokens}


def extract_figures(ex: dict, layers: int) -> list[dict]:
    n = ex["samples"]
    full = realshape.FULL_DEPTH
    # Extract and the bare forwards run the same decoder and tower layers; only those scale with depth.
    grow = (full["teacher"] - layers) * ex["lm_layer_seconds"] + (full["tower"] - layers) * ex["tower_layer_seconds"]
    rows = [figure("extract: seconds per sample", ex["loop_seconds"] / n),
            figure("extract: seconds per sample, extrapolated to 28 + 27 layers", (ex["loop_seconds"] + grow) / n),
            figure(f"extract / bare teacher forwards ({layers} layers)", ex["loop_seconds"] / ex["bare_seconds"],
                   "<=", 1.10),
            figure("extract / bare teacher forwards, extrapolated to 28 + 27 layers",
                   (ex["loop_seconds"] + grow) / (ex["bare_seconds"] + grow), "<=", 1.10)]
    for signal, v in ex["bytes_per_sample"].items():
        rows.append(figure(f"cache bytes / sample, {signal}", v))
    for signal, v in ex["bytes_per_response_token"].items():
        rows.append(figure(f"cache bytes / response token, {signal}", v))
    return rows


def full_depth_steps(d: dict) -> dict[str, float]:
    """Step seconds at 24 decoder and 27 tower layers: the measured step plus the seconds the hooks
    timed inside one decoder layer (forward and backward) and one tower layer, per missing layer."""
    full, n = realshape.FULL_DEPTH, d["layers"]
    return {r: t + (full["student"] - n) * d["decoder_layer_seconds"][r] + (full["tower"] - n)
            * d["tower_layer_seconds"][r] for r, t in d["step_seconds"].items()}


def distill_figures(d: dict, stream: dict, memory: dict) -> list[dict]:
    t, peak = d["step_seconds"], d["peak_rss_above_baseline_bytes"]
    floor = d["ribbon_token_ratio"]
    pad, vocab = d["padded"], f"{d['padded']['student_vocab']:,}"
    rows = [figure(f"padded-vocab warning fires exactly when ids >= {vocab} carry mass > 1e-6",
                   float(pad["warned"] == pad["expected"]), ">=", 1.0,
                   note=f"warned={pad['warned']}, max mass {pad['max_mass']:.2e}"),
            figure(f"max teacher mass on ids >= {vocab} in a cached row", pad["max_mass"]),
            figure(f"TPA candidates >= {vocab} (masked: weight 0, outside the warning), fraction",
                   pad["tpa_candidates_padded"] / max(pad["tpa_candidates"], 1)),
            figure(f"largest teacher probability of a masked candidate >= {vocab}",
                   pad["tpa_padded_candidate_max_prob"])]
    for name, frac in pad["rows_with_padded_ids"].items():
        rows.append(figure(f"cached {name} rows with ids >= {vocab}, fraction", frac))
    for recipe in ("sft", "kd", "alignti"):
        rows.append(figure(f"distill: {recipe} step seconds", t[recipe]))
        rows.append(figure(f"distill: {recipe} step peak RSS above baseline (GB)", peak[recipe] / 1e9))
    full = full_depth_steps(d)
    rows += [figure("distill: KD / SFT step", t["kd"] / t["sft"], "<=", 1.05),
             figure("distill: KD / SFT step, extrapolated to 24 + 27 layers", full["kd"] / full["sft"], "<=", 1.05),
             figure("distill: ribbon token ratio (the Align-TI floor)", floor),
             figure("distill: Align-TI / SFT step", t["alignti"] / t["sft"], "<=", round(1.05 * floor, 4),
                    note="target: 1.05 x the ribbon token ratio"),
             figure("distill: Align-TI / SFT step, extrapolated to 24 + 27 layers", full["alignti"] / full["sft"],
                    "<=", round(1.05 * floor, 4), note="target: 1.05 x the ribbon token ratio"),
             figure("distill: Align-TI / SFT peak memory", peak["alignti"] / peak["sft"], "<=", 1.15),
             figure("distill: first epoch streamed / from memory, step time", stream["ratio"], "<=", 1.03,
                    note=stream["note"]),
             figure(f"offline / online peak memory ({d['layers']} layers, measured)", memory["measured_ratio"]),
             figure("offline peak memory at full depth (GB)", memory["offline_full"] / 1e9),
             figure("online peak memory at full depth (GB)", memory["online_full"] / 1e9),
             figure("offline / online peak memory at the paper's sizes (extrapolated)", memory["full_ratio"],
                    "<=", 0.5)]
    return rows


def main(argv: list[str] | None = None) -> dict | None:
    """Run the benchmark (or, with --worker, the distill worker); returns the result written to --out."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=2, help="decoder and tower layers of every model")
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--extract-batch", type=int, default=2)
    ap.add_argument("--extract-dtype", default="bf16", choices=("bf16", "fp32"),
                    help="teacher precision for extraction (bf16: as on GPUs, and faster on CPUs with bf16 units)")
    ap.add_argument("--batch-size", type=int, default=1, help="samples per distill micro-batch")
    ap.add_argument("--warmup", type=int, default=1, help="untimed rounds of the distill steps")
    ap.add_argument("--steps", type=int, default=2, help="timed rounds (one step of each recipe per round)")
    ap.add_argument("--num-workers", type=int, default=2, help="loader workers of the streamed epoch, where the "
                    "trainer has --num-workers")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--quick", action="store_true", help="small widths and 4 samples: a smoke run of the script")
    ap.add_argument("--work-dir", default=None, help="keep the world here (default: a temporary directory)")
    ap.add_argument("--out", default="bench/results/scale.json")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    widths = realshape.QUICK if args.quick else realshape.REAL
    if args.quick:
        args.samples = min(args.samples, 4)
    torch.set_num_threads(args.threads)
    if args.worker:
        print(json.dumps(distill_worker(Path(args.work), args)))
        return None
    start, phases = time.time(), {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work_dir or tmp)
        corpus = realshape.build_corpus(work / "shapes", args.samples, widths)
        realshape.build_models(work, corpus, widths, args.layers, args.layers)
        phases["world"] = time.time() - start
        ex = extract_part(work, args)
        phases["extract"] = time.time() - start - sum(phases.values())
        passthrough = ["--layers", str(args.layers), "--batch-size", str(args.batch_size), "--warmup",
                       str(args.warmup), "--steps", str(args.steps), "--threads", str(args.threads)]
        d = run_worker(__file__, "distill", work, passthrough)
        phases["distill"] = time.time() - start - sum(phases.values())
        stream = stream_epochs(work, args)
        phases["stream"] = time.time() - start - sum(phases.values())
    memory = extrapolate_memory(d)
    print("\n" + memory["formula"])
    rows = extract_figures(ex, args.layers) + distill_figures(d, stream, memory)
    result = {"figures": rows, "extract": ex, "distill": d, "stream": stream, "memory": memory,
              "config": {k: v for k, v in vars(args).items() if k not in ("worker", "work")},
              "widths": dataclasses.asdict(widths), "torch_threads": torch.get_num_threads(),
              "phase_seconds": phases, "wall_seconds": time.time() - start}
    print_figures(rows)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"\nwrote {args.out} ({result['wall_seconds']:.0f} s: "
          + ", ".join(f"{k} {v:.0f} s" for k, v in phases.items()) + ")")
    return result


if __name__ == "__main__":
    main()
