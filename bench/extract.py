"""Extraction cost: probe overhead and extract wall time vs the bare teacher forwards it needs.

    python bench/extract.py [--hidden 1024 --layers 8 --n 96 --out bench/results/extract.json]

Builds a CPU-compute-bound tiny teacher (random weights) on the shapes corpus and reports, in
one run:
- probe forward / plain SDPA forward (one probed layer; target <= 1.05),
- extract loop wall time / the bare teacher forwards it needs (plain pass with cache + candidate
  pass, no probe, no LM head, no writes; target <= 1.15),
- samples/s and cache bytes per response token.
Timings interleave the variants and take the median of repeats to damp machine noise.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import DynamicCache

from alignti.data.batching import collate, length_grouped
from alignti.data.corpus import read_corpus
from alignti.data.encode import EncodedSample, SampleEncoder
from alignti.data.shapes import ShapesConfig, run_shapes
from alignti.models.probe import probe_attention, probe_targets
from alignti.models.ribbon import build_candidate_pass
from alignti.extract.run import ExtractConfig, run_extract
from alignti.extract.signals import propose_top
from alignti.models.family import load_parts, save_model_dir
from alignti.models.llava import TinySpec, build_tiny_llava
from alignti.models.loading import load_model
from alignti.models.tokenizer import train_tokenizer


def build(work: Path, args: argparse.Namespace) -> tuple[Path, Path]:
    shapes = work / "shapes"
    run_shapes(ShapesConfig(out=str(shapes), n=args.n, seed=0, image_size=64))
    texts = [t["value"] for r in json.loads((shapes / "train.json").read_text()) for t in r["conversations"]]
    spec = TinySpec(hidden=args.hidden, layers=args.layers, heads=8, kv_heads=4, vision_hidden=64,
                    image_size=64, patch=8)
    model, processor = build_tiny_llava(spec, train_tokenizer(texts, vocab_size=512))
    return save_model_dir(model, processor, work / "teacher"), shapes


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@torch.inference_mode()
def bare_forwards(model, batches: list, pad_id: int, d: int) -> float:
    """Seconds for the teacher forwards extraction needs: plain pass with cache + candidate pass."""
    total = 0.0
    for group in batches:
        batch = collate(group, pad_id)
        t0 = time.perf_counter()
        cache = DynamicCache(config=model.config.get_text_config())
        hidden = model.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                             **batch.images, cache=cache, use_cache=True)[0]
        total += time.perf_counter() - t0
        # candidates chosen outside the timed region (they need the LM head)
        steps = [s.resp_positions for s in group]
        cands = []
        for b, s in enumerate(group):
            logits = model.lm_head(hidden[b, s.resp_positions])
            cands.append(propose_top(logits.topk(d + 1).indices, s.input_ids[s.resp_positions + 1], d))
        t0 = time.perf_counter()
        cp = build_candidate_pass([s.input_ids for s in group], steps, cands, batch.input_ids.shape[1], pad_id,
                                  image_token_id=model.config.image_token_id)
        model.model(**cp.model_inputs(), cache=cache, use_cache=True)
        total += time.perf_counter() - t0
    return total


def probe_ratio(model, group: list[EncodedSample], pad_id: int, layer: int, repeats: int) -> dict:
    batch = collate(group, pad_id)
    kw = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask, **batch.images,
              use_cache=False)
    queries, keys = probe_targets(tuple(group))

    def plain() -> None:
        with torch.inference_mode():
            model.model(**kw)

    def probed() -> None:
        with torch.inference_mode(), probe_attention(model, [layer], queries, keys):
            model.model(**kw)

    plain(), probed()  # warm-up
    p, q = [], []
    for _ in range(repeats):  # interleaved
        p.append(timed(plain, 1))
        q.append(timed(probed, 1))
    return {"plain_s": statistics.median(p), "probe_s": statistics.median(q),
            "ratio": statistics.median(q) / statistics.median(p)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--n", type=int, default=96)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: stable on a shared machine)")
    ap.add_argument("--out", default="bench/results/extract.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        teacher_dir, shapes = build(work, args)
        model, processor = load_model(teacher_dir), load_parts(teacher_dir)
        pad_id = processor.tokenizer.pad_token_id
        encoder = SampleEncoder(processor, str(shapes), 1024)
        samples = [encoder.encode(r) for r in read_corpus(shapes / "train.json")]
        batches = list(length_grouped(samples, args.batch_size))
        layer = args.layers // 2
        probe = probe_ratio(model, batches[0], pad_id, layer, args.repeats)
        cfg = ExtractConfig(teacher=str(teacher_dir), data=str(shapes / "train.json"), image_root=str(shapes),
                            out=str(work / "cache"), iva_layer=str(layer), batch_size=args.batch_size)
        bare_forwards(model, batches[:1], pad_id, cfg.tpa_d)  # warm-up
        bare = bare_forwards(model, batches, pad_id, cfg.tpa_d)
        summary = run_extract(cfg)
    result = {
        "config": vars(args),
        "probe_forward_over_plain": round(probe["ratio"], 4), "probe_target": 1.05,
        "extract_over_bare_forwards": round(summary["loop_seconds"] / bare, 4), "extract_target": 1.15,
        "extract_loop_s": summary["loop_seconds"], "bare_forwards_s": round(bare, 4),
        "samples_per_s": round(summary["samples_written"] / summary["loop_seconds"], 2),
        "bytes_per_response_token": summary["bytes_per_response_token"],
        "bytes_per_response_token_by_signal": summary["bytes_per_response_token_by_signal"],
    }
    print(f"{'figure':<40}{'value':>12}{'target':>10}")
    print(f"{'probe forward / plain SDPA forward':<40}{result['probe_forward_over_plain']:>12.3f}{'<= 1.05':>10}")
    print(f"{'extract loop / bare teacher forwards':<40}{result['extract_over_bare_forwards']:>12.3f}{'<= 1.15':>10}")
    print(f"{'samples/s':<40}{result['samples_per_s']:>12.2f}")
    print(f"{'bytes per response token (all signals)':<40}{result['bytes_per_response_token']:>12.1f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
