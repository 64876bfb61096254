"""`alignti irs`: score every LM layer of the teacher for instruction-aware visual focus.

Runs the probe on all LM layers over a calibration sample of the corpus, computes
IRS(l) (irs_score.py), picks l* = argmax, and writes `irs.json` plus a small bar chart. Samples
are compared only with samples of the same vision-token grid (dynamic-resolution models give
images of different sizes different grids; docs/method.md).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from transformers import PreTrainedModel

from alignti.data.batching import collate, length_grouped
from alignti.data.corpus import check_corpus, check_image_root, read_corpus
from alignti.data.encode import EncodedSample, SampleEncoder
from alignti.cliargs import write_run_file
from alignti.errors import AlignTIError
from alignti.extract.config import IrsConfig
from alignti.extract.irs_score import choose_layer, irs_scores_by_grid
from alignti.models.family import decoder_hidden, load_parts
from alignti.models.loading import load_model, resolve_device, resolve_dtype
from alignti.models.probe import probe_attention, probe_targets
from alignti.progress import progress_bar
from alignti.storage.files import write_errors


def calibration_samples(encoder: SampleEncoder, data: str, n: int, hint: str = "") -> list[EncodedSample]:
    """The first n encodable samples that have an image (rejects are skipped); an AlignTIError
    saying why (and `hint`) when there are fewer than the 2 that IRS needs."""
    out, rejects = [], Counter()
    example = ""
    for row in read_corpus(data):
        if len(out) >= n:
            break
        if getattr(row, "image", None):
            enc = encoder.encode(row)
            if isinstance(enc, EncodedSample):
                out.append(enc)
            else:
                rejects[enc.reason] += 1
                example = example or enc.detail
    if len(out) < 2:
        why = (f"rows with images rejected: {', '.join(f'{r} {k}' for r, k in rejects.most_common())}, e.g. "
               f"{example} (image root {encoder.image_root})" if rejects else "no row has an image")
        raise AlignTIError(f"IRS needs >= 2 usable samples with images in {data}, found {len(out)} ({why})"
                           + (f"; {hint}" if hint else ""))
    return out


def check_calibration(samples: list[EncodedSample], hint: str) -> None:
    """AlignTIError (the corpus's fault, said before the model loads) unless two calibration samples
    share a vision-token grid: IRS compares only such pairs."""
    counts = Counter(s.images.grids[0] for s in samples)
    if not counts or max(counts.values()) < 2:
        raise AlignTIError(f"IRS needs >= 2 usable samples with images of the same vision-token grid, found "
                           f"{len(samples)} samples over {len(counts)} grid(s); {hint}")


@torch.inference_mode()
def compute_irs(model: PreTrainedModel, samples: Iterable[EncodedSample], pad_id: int,
                batch_size: int = 8, progress: bool = False) -> torch.Tensor:
    """IRS score of every LM layer -> fp64 [L], over the pairs of samples (with images) that share a
    vision-token grid; ValueError without two such samples."""
    samples = list(samples)
    layers = list(range(model.config.get_text_config().num_hidden_layers))
    by_grid: dict[tuple, list[torch.Tensor]] = {}
    batches = list(length_grouped(samples, batch_size))
    for group in progress_bar(batches, desc="irs", unit="batch", disable=not progress):
        batch = collate(group, pad_id).to(model.device, model.dtype)
        queries, keys = probe_targets(batch.samples)
        with probe_attention(model, layers, queries, keys) as probe:
            decoder_hidden(model, batch.input_ids, batch.attention_mask, batch.images, use_cache=False)
        res = torch.stack([probe.result(normalize=True)[layer] for layer in layers], dim=1).cpu()  # [B, L, max n_v]
        for s, alpha in zip(group, res):
            by_grid.setdefault(s.images.grids[0], []).append(alpha[:, : s.n_v])  # [L, n_v]
    return irs_scores_by_grid([torch.stack(g) for g in by_grid.values()])


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
    out = Path(cfg.out)
    check_corpus(cfg.data)
    check_image_root(cfg.image_root)
    if out.is_dir() or out.with_suffix(".png").is_dir():
        raise AlignTIError(f"--out {str(out)!r} (and its .png beside it) must be a file path, not a directory")
    device = resolve_device(cfg.device)
    parts = load_parts(cfg.teacher)
    encoder = SampleEncoder(parts, cfg.image_root, cfg.max_length)
    samples = calibration_samples(encoder, cfg.data, cfg.samples)  # the corpus's fault: said before the model loads
    check_calibration(samples, f"corpus {cfg.data}")
    model = load_model(cfg.teacher, device, resolve_dtype(cfg.dtype, device))
    scores = compute_irs(model, samples, parts.tokenizer.pad_token_id, cfg.batch_size, progress=True)
    chosen = choose_layer(scores)
    result = {"scores": scores.tolist(), "layer": chosen, "num_samples": len(samples)}
    with write_errors("IRS result", out):
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))
        plot_irs(result["scores"], chosen, out.with_suffix(".png"))
    write_run_file(cfg, out.with_suffix(".yaml"), "irs")
    return result

