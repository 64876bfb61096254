"""GPU check: the real-shape pipeline in bf16 on one CUDA device. Without CUDA it says so and exits 0.

    python bench/gpu_check.py [--layers 4 --samples 16 --steps 12 --out bench/results/gpu_check.json]
    python bench/gpu_check.py --device cpu --quick      # the same code on CPU at small widths (a dry run)

It builds `realshape.py`'s world at --layers (random weights; Qwen2.5-7B teacher and 0.5B student
widths, SigLIP-so400m tower, 729 vision tokens; about 3 minutes on an H200 at the defaults) and runs:

1. extract: `run_extract`, dtype auto (bf16 on CUDA): seconds per sample, peak GPU memory.
2. ribbon: the trainer's batch of one cached sample (`build_distill_batch`) through the trainer's
   forward (`Objective._hidden`: fp32 master weights under bf16 autocast, SDPA with the ribbon's
   additive mask), and again without autocast (fp32). Each candidate row of the first CHECKED_STEPS
   steps is compared with a separate plain forward of (y_0..y_t, a) in the same precision, and the
   ground-truth rows with a plain forward of the sample: mean and max |log p difference| must be
   within that precision's tolerance (TOL). Controls (reported, not asserted:
   `sensitive` says whether they are CONTROL_FACTOR x larger, i.e. whether the check could have
   failed): the same candidate after the wrong prefix (y_t left out), and at position t + 2.
   Random std-0.02 weights attend almost uniformly, which hides a wrong mask; the models of checks
   2 and 3 get their query and key projections scaled by SHARPEN (attention logits x SHARPEN^2).
3. probe: the teacher in bf16, as extraction runs it: the probe's saliency at the cache's IVA layer
   against the same average (heads, instruction queries; vision keys; L1-normalised) of eager
   attention's `output_attentions`: cosine >= 0.99; control (reported): another layer's.
4. distill: `run_distill`, recipe alignti, dtype auto (bf16 autocast), --steps steps of
   --batch-size: median step seconds (first two left out), tokens/s, peak GPU memory, finite losses.

Writes the JSON (--out) and exits 1 if a check fails.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

CHECKED_STEPS = 3
SHARPEN = 3.0
TOL = {"bf16": (0.02, 0.25), "fp32": (1e-4, 2e-3)}  # (mean, max) |log p| difference in nats
CONTROL_FACTOR = 5.0  # a control differing this much more than the compared rows shows the check can fail


def sharpen(model) -> None:
    """Scale the LM's query and key projections (weights and biases) by SHARPEN: peaked attention."""
    with torch.no_grad():
        for name, p in model.model.language_model.named_parameters():
            if ".q_proj." in name or ".k_proj." in name:
                p.mul_(SHARPEN)


def log_probs(head, rows: torch.Tensor) -> torch.Tensor:
    return head(rows).float().log_softmax(-1)


def ribbon_check(work: Path, device: str, precision: str) -> dict:
    """Ribbon rows vs separate forwards under bf16 autocast or in fp32 (`precision`)."""
    from alignti.data.encode import SampleEncoder
    from alignti.distill.batches import build_distill_batch
    from alignti.distill.config import LossConfig
    from alignti.distill.examples import cache_examples
    from alignti.distill.objective import Objective
    from alignti.models.family import load_parts
    from alignti.models.loading import load_model
    from alignti.storage.reader import CacheReader

    processor = load_parts(work / "student")
    examples, _ = cache_examples(CacheReader.open(str(work / "cache")), SampleEncoder(processor, None, 4096), None)
    ex = examples.get_many([0])[0]
    model = load_model(work / "student", device, torch.float32)
    sharpen(model)
    loss_cfg = LossConfig("alignti")
    vocab = model.get_input_embeddings().num_embeddings
    batch = build_distill_batch([ex], processor.tokenizer.pad_token_id, model.config.image_token_id, loss_cfg,
                                device, torch.float32, vocab_size=vocab)
    autocast = torch.bfloat16 if precision == "bf16" else None
    objective, head = Objective(model, loss_cfg, autocast=autocast), model.get_output_embeddings()
    ids, images = ex.student.input_ids.to(device), batch.images
    steps = ex.student.resp_positions[torch.from_numpy(ex.signals.tpa_rows.astype("int64"))][:CHECKED_STEPS]
    d = ex.signals.tpa_cand_ids.shape[1]
    rows = batch.tpa_rows[: len(steps) * d]  # step-major: row t * d + j
    cands = batch.input_ids.reshape(-1)[rows].view(-1, d)  # the ids the ribbon fed (masked ones as pad)

    def plain_last(prefix: torch.Tensor, shift: int = 0) -> torch.Tensor:  # [T] -> last row's hidden state [H]
        positions = torch.arange(prefix.numel(), device=device)
        positions[-1] += shift
        return model.model(input_ids=prefix[None], attention_mask=torch.ones_like(prefix)[None],
                           position_ids=positions[None], **images, use_cache=False)[0][0, -1]

    with torch.no_grad(), torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=autocast is not None):
        flat = objective._hidden(batch, [])[0].reshape(-1, model.config.get_text_config().hidden_size)
        ribbon = log_probs(head, flat[rows])
        right, no_yt, moved = [], [], []
        for i, (t, row) in enumerate(zip(steps.tolist(), cands.tolist())):
            for j, a in enumerate(row):
                cand = torch.tensor([a], device=device)  # the candidate stands where y_(t+1) was
                ref = ribbon[i * d + j]
                right.append(log_probs(head, plain_last(torch.cat([ids[: t + 1], cand]))) - ref)
                no_yt.append(log_probs(head, plain_last(torch.cat([ids[:t], cand]))) - ref)
                moved.append(log_probs(head, plain_last(torch.cat([ids[: t + 1], cand]), shift=1)) - ref)
        plain = model.model(input_ids=ids[None], attention_mask=torch.ones_like(ids)[None], **images,
                            use_cache=False)[0][0]
        gt = log_probs(head, plain[ex.student.resp_positions.to(device)]) - log_probs(head, flat[batch.resp_rows])
    right = torch.stack(right).abs()
    out = {"candidate_rows": right.shape[0], "candidate_mean": float(right.mean()), "candidate_max": float(right.max()),
           "control_without_yt_mean": float(torch.stack(no_yt).abs().mean()),
           "control_position_plus_1_mean": float(torch.stack(moved).abs().mean()),
           "gt_rows": gt.shape[0], "gt_mean": float(gt.abs().mean()), "gt_max": float(gt.abs().max()),
           "ribbon_width": int(batch.input_ids.shape[1])}
    tol_mean, tol_max = TOL[precision]
    out["ok"] = (out["candidate_mean"] <= tol_mean and out["candidate_max"] <= tol_max and out["gt_mean"] <= tol_mean
                 and out["gt_max"] <= tol_max)
    out["sensitive"] = min(out["control_without_yt_mean"], out["control_position_plus_1_mean"]) >= \
        CONTROL_FACTOR * max(out["candidate_mean"], out["gt_mean"])
    return out


def probe_check(work: Path, device: str) -> dict:
    from alignti.data.batching import collate
    from alignti.data.corpus import read_corpus
    from alignti.data.encode import SampleEncoder
    from alignti.models.family import load_parts
    from alignti.models.loading import load_model
    from alignti.models.probe import l1_normalize, probe_attention, probe_targets
    from alignti.storage.reader import CacheReader

    layer = CacheReader.open(str(work / "cache")).manifest.settings.iva_layer
    other = layer - 1 if layer > 0 else layer + 1
    processor = load_parts(work / "teacher")
    encoder = SampleEncoder(processor, str(work / "shapes"), 4096)
    samples = [encoder.encode(r) for r in list(read_corpus(work / "shapes" / "long.json"))[:2]]
    batch = collate(samples, processor.tokenizer.pad_token_id).to(device, torch.bfloat16)
    model = load_model(work / "teacher", device, torch.bfloat16)
    sharpen(model)
    queries, keys = probe_targets(batch.samples)
    inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask, **batch.images}
    with torch.no_grad():
        with probe_attention(model, [layer], queries, keys) as probe:
            model.model(**inputs)
        alpha = probe.result(normalize=True)[layer].float()  # [B, n_v]
        model.set_attn_implementation({"text_config": "eager"})
        attentions = model.model(**inputs, output_attentions=True).attentions  # per layer [B, heads, T, T]

    def eager_alpha(at: int) -> torch.Tensor:
        rows = [attentions[at][b].float().mean(0)[queries[b].to(device)][:, keys[b].to(device)].mean(0)
                for b in range(len(samples))]
        return l1_normalize(torch.stack(rows))

    cos = torch.nn.functional.cosine_similarity(alpha, eager_alpha(layer), dim=-1)
    control = torch.nn.functional.cosine_similarity(alpha, eager_alpha(other), dim=-1)
    out = {"layer": layer, "cosine_min": float(cos.min()), "control_layer": other, "control_cosine_max":
           float(control.max()), "max_abs": float((alpha - eager_alpha(layer)).abs().max())}
    out["ok"] = out["cosine_min"] >= 0.99
    out["sensitive"] = out["control_cosine_max"] < out["cosine_min"] - 0.01
    return out


def peak_gb(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / 1e9 if device == "cuda" else None


def reset_peak(device: str) -> None:
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def pipeline(work: Path, args: argparse.Namespace) -> dict:
    """extract, then distill, on args.device; times, peak memory and finite losses."""
    from alignti.distill.config import DistillConfig, LossConfig
    from alignti.distill.train import run_distill
    from alignti.extract.run import ExtractConfig, run_extract

    reset_peak(args.device)
    summary = run_extract(ExtractConfig(teacher=str(work / "teacher"), data=str(work / "shapes" / "long.json"),
                                        image_root=str(work / "shapes"), out=str(work / "cache"),
                                        iva_layer=str(args.layers // 2), batch_size=8, device=args.device,
                                        max_length=4096))
    out = {"extract_seconds_per_sample": summary["loop_seconds"] / summary["samples_written"],
           "extract_peak_gb": peak_gb(args.device), "bytes_per_response_token": summary["bytes_per_response_token"]}
    reset_peak(args.device)
    run_distill(DistillConfig(cache=str(work / "cache"), student=str(work / "student"), out=str(work / "distill"),
                              loss=LossConfig("alignti"), max_steps=args.steps, batch_size=args.batch_size,
                              save_every=0, progress=False, device=args.device, max_length=4096))
    log = [json.loads(line) for line in (work / "distill" / "log.jsonl").read_text().splitlines() if line]
    seconds = [r["tokens"] / r["tokens_per_second"] for r in log]
    seconds = seconds[2:] or seconds  # the first two steps warm up
    out.update(distill_step_seconds=statistics.median(seconds), distill_peak_gb=peak_gb(args.device),
               distill_tokens_per_second=statistics.median(r["tokens_per_second"] for r in log),
               losses_finite=all(math.isfinite(r["loss"]) for r in log), last_losses={
                   k: log[-1][k] for k in ("loss", "sft", "kd", "iva", "tpa") if k in log[-1]})
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", help="cuda, or cpu for a dry run of the same code")
    ap.add_argument("--layers", type=int, default=4, help="decoder and tower layers of every model")
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--steps", type=int, default=12, help="distill steps")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--quick", action="store_true", help="realshape's small widths (with --device cpu)")
    ap.add_argument("--out", default="bench/results/gpu_check.json")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; nothing was checked (run it on a GPU machine)")
        return 0
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import realshape

    widths = realshape.QUICK if args.quick else realshape.REAL
    start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        corpus = realshape.build_corpus(work / "shapes", args.samples, widths)
        realshape.build_models(work, corpus, widths, args.layers, args.layers)
        result = {"pipeline": pipeline(work, args), "ribbon_bf16": ribbon_check(work, args.device, "bf16"),
                  "ribbon_fp32": ribbon_check(work, args.device, "fp32"), "probe": probe_check(work, args.device)}
    result.update(device=torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
                  config=vars(args), widths=dataclasses.asdict(widths), wall_seconds=time.time() - start,
                  tolerances={"ribbon": TOL, "control_factor": CONTROL_FACTOR, "sharpen": SHARPEN})
    ok = all(result[k]["ok"] for k in ("ribbon_bf16", "ribbon_fp32", "probe")) and result["pipeline"]["losses_finite"]
    result["ok"] = ok
    print(json.dumps(result, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"gpu_check: {'all checks passed' if ok else 'A CHECK FAILED'} ({result['wall_seconds']:.0f} s); "
          f"wrote {args.out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
