"""`alignti irs`: score every LM layer of the teacher for instruction-aware visual focus.

Runs the probe on all LM layers over a calibration sample of the corpus, computes
IRS(l) (irs_score.py), picks l* = argmax, and writes `irs.json` plus a small bar chart.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from transformers import PreTrainedModel

from alignti.data.batching import collate, length_grouped
from alignti.data.corpus import read_corpus
from alignti.data.encode import EncodedSample, SampleEncoder
from alignti.errors import AlignTIError
from alignti.extract.irs_score import choose_layer, irs_scores
from alignti.models.probe import probe_attention, probe_targets
from alignti.models.loading import load_model, load_processor, resolve_device, resolve_dtype
from alignti.progress import progress_bar


@dataclass(frozen=True)
class IrsConfig:
    """`alignti irs` options."""

    teacher: str = field(metadata={"help": "teacher model directory"})
    data: str = field(metadata={"help": "corpus (LLaVA JSON or JSONL)"})
    image_root: str = field(metadata={"help": "directory image paths are relative to"})
    out: str = field(default="irs.json", metadata={"help": "output JSON (a .png plot is written beside it)"})
    samples: int = field(default=256, metadata={"help": "calibration samples (with images)"})
    batch_size: int = field(default=8, metadata={"help": "samples per forward"})
    max_length: int = field(default=2048, metadata={"help": "longest sample in tokens"})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda[:i]"})
    dtype: str = field(default="auto", metadata={"help": "auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16 | fp16"})


def calibration_samples(encoder: SampleEncoder, data: str, n: int) -> list[EncodedSample]:
    """The first n encodable samples that have an image (rejects are skipped)."""
    out = []
    for row in read_corpus(data):
        if len(out) >= n:
            break
        if getattr(row, "image", None):
            enc = encoder.encode(row)
            if isinstance(enc, EncodedSample):
                out.append(enc)
    return out


@torch.inference_mode()
def compute_irs(model: PreTrainedModel, samples: Iterable[EncodedSample], pad_id: int,
                batch_size: int = 8, progress: bool = False) -> torch.Tensor:
    """IRS score of every LM layer -> fp64 [L]. Samples must have images with equal n_v."""
    samples = list(samples)
    if len(samples) < 2:
        raise ValueError("IRS needs at least 2 calibration samples with images")
    n_v = {s.n_v for s in samples}
    if len(n_v) != 1:
        raise ValueError(f"IRS needs one vision-token count, got {sorted(n_v)}")
    layers = list(range(model.config.get_text_config().num_hidden_layers))
    alphas = []
    batches = list(length_grouped(samples, batch_size))
    for group in progress_bar(batches, desc="irs", unit="batch", disable=not progress):
        batch = collate(group, pad_id).to(model.device, model.dtype)
        queries, keys = probe_targets(batch.samples, group[0].n_v)
        with probe_attention(model, layers, queries, keys) as probe:
            model.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                        pixel_values=batch.pixel_values, use_cache=False)
        res = probe.result(normalize=True)
        alphas.append(torch.stack([res[layer] for layer in layers], dim=1).cpu())  # [B, L, n_v]
    return irs_scores(torch.cat(alphas))


def plot_irs(scores: list[float], chosen: int, path: Path) -> None:
    """A small bar chart of IRS per layer (PIL only; the chosen layer in orange)."""
    w, h, pad = max(240, 24 * len(scores) + 40), 180, 24
    img = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(img)
    top = max(max(scores), 1e-9)
    bar_w = (w - 2 * pad) / len(scores)
    for i, s in enumerate(scores):
        x0 = pad + i * bar_w
        y0 = h - pad - (h - 2 * pad) * max(s, 0) / top
        draw.rectangle([x0 + 2, y0, x0 + bar_w - 2, h - pad], fill="darkorange" if i == chosen else "steelblue")
        draw.text((x0 + 3, h - pad + 4), str(i), fill="black")
    draw.text((pad, 4), f"IRS per layer (l* = {chosen}, max {top:.3f})", fill="black")
    img.save(path)


def run_irs(cfg: IrsConfig) -> dict:
    """Score the layers, write irs.json and irs.png, return the result."""
    device = resolve_device(cfg.device)
    processor = load_processor(cfg.teacher)
    encoder = SampleEncoder(processor, cfg.image_root, cfg.max_length)
    samples = calibration_samples(encoder, cfg.data, cfg.samples)
    if len(samples) < 2:  # the corpus's fault: said before the model is loaded
        raise AlignTIError(f"irs needs >= 2 usable samples with images in {cfg.data}, found {len(samples)}")
    model = load_model(cfg.teacher, device, resolve_dtype(cfg.dtype, device))
    scores = compute_irs(model, samples, processor.tokenizer.pad_token_id, cfg.batch_size, progress=True)
    chosen = choose_layer(scores)
    result = {"scores": scores.tolist(), "layer": chosen, "num_samples": len(samples)}
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    plot_irs(result["scores"], chosen, out.with_suffix(".png"))
    return result

