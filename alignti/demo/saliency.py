"""Teacher saliency on held-out images: how much of it lands on the asked-about object, and pictures.

The saliency is the IVA weight vector alpha_{l*}(x) over the n_v vision tokens (a square grid
of patches, row-major, as SigLIP emits them). `box_mass` measures the share of it inside an
object's box, `peak_in_box` whether its peak falls on the object; `overlay` draws it over the
image with the question printed on the picture.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from transformers import PreTrainedModel

from alignti.data.batching import collate, length_grouped
from alignti.data.boxes import patch_overlap
from alignti.data.corpus import CorpusRow, read_corpus
from alignti.data.encode import EncodedSample, SampleEncoder
from alignti.extract.teacher import plain_pass
from alignti.models.family import ModelParts, load_parts
from alignti.models.loading import load_model


@dataclass(frozen=True)
class SaliencyItem:
    """One held-out sample with the teacher's saliency and the queried object's box."""

    sample: EncodedSample
    saliency: np.ndarray  # float32 [n_v], sums to 1
    box: tuple[float, float, float, float] | None  # x0, y0, x1, y1 in original image pixels
    image_size: tuple[int, int]  # original (width, height)
    question: str
    answer: str  # the gold answer (the corpus's)


def box_mass(saliency: np.ndarray, size: tuple[int, int],
             box: tuple[float, float, float, float]) -> tuple[float, float]:
    """(saliency mass inside the box, the box's share of the image area)."""
    grid = int(round(math.sqrt(saliency.shape[0])))
    frac = patch_overlap(grid, size, box)
    w, h = size
    share = (box[2] - box[0]) * (box[3] - box[1]) / (w * h)
    return float((saliency.astype(np.float64) * frac).sum()), float(share)


def _touching(saliency: np.ndarray, size: tuple[int, int], box: tuple[float, float, float, float]) -> np.ndarray:
    """bool [n_v]: the patches the box overlaps."""
    grid = int(round(math.sqrt(saliency.shape[0])))
    return patch_overlap(grid, size, box) > 0


def peak_in_box(saliency: np.ndarray, size: tuple[int, int],
                box: tuple[float, float, float, float]) -> tuple[bool, float]:
    """(whether the most salient patch overlaps the box, the share of patches that do: the chance
    that a random patch would)."""
    touches = _touching(saliency, size, box)
    return bool(touches[int(np.argmax(saliency))]), float(touches.mean())


def object_patch_mass(saliency: np.ndarray, size: tuple[int, int],
                      box: tuple[float, float, float, float]) -> tuple[float, float]:
    """(saliency mass on the patches the box overlaps, those patches' share of all patches).

    The vision-token view of `box_mass`: a token is all the model can attend to, so a teacher
    looking only at the object's tokens scores 1 here, while `box_mass` caps it at the box's
    share of those patches (about a third with the demo's one-token-per-quadrant grid).
    """
    touches = _touching(saliency, size, box)
    return float(saliency.astype(np.float64)[touches].sum()), float(touches.mean())


@torch.inference_mode()
def teacher_saliency(model: PreTrainedModel, processor: ModelParts, data: str, image_root: str, layer: int,
                     limit: int, batch_size: int = 16) -> list[SaliencyItem]:
    """Saliency at `layer` for the first `limit` image samples of a corpus: one plain teacher pass
    with the probe per batch (`extract.teacher.plain_pass`, the pass extraction caches it from)."""
    encoder = SampleEncoder(processor, image_root, 4096)
    pad_id = processor.tokenizer.pad_token_id
    rows: dict[str, CorpusRow] = {}
    samples = []
    for row in read_corpus(data):
        if len(samples) >= limit:
            break
        enc = encoder.encode(row) if isinstance(row, CorpusRow) and row.image else None
        if isinstance(enc, EncodedSample):
            samples.append(enc)
            rows[enc.sample_id] = row
    items = []
    for group in length_grouped(samples, batch_size):
        _, saliency = plain_pass(model, collate(group, pad_id).to(model.device, model.dtype), layer)  # [B, n_v]
        for b, s in enumerate(group):
            row = rows[s.sample_id]
            box = row.extra.get("target_box")
            items.append(SaliencyItem(s, saliency[b, : s.n_v].float().cpu().numpy(), tuple(box) if box else None,
                                      s.image_size, row.turns[0][1].replace("<image>", "").strip(), row.turns[1][1]))
    return items


def overlay(image: Image.Image, item: SaliencyItem, side: int = 256) -> Image.Image:
    """The image upscaled and dimmed where the saliency is low (the most salient patch keeps full
    brightness, a patch with none keeps 20%), each patch's share printed on it (grids up to 8 x 8),
    the box outlined, the question and its gold answer (the corpus's) printed above."""
    grid = int(round(math.sqrt(item.saliency.shape[0])))
    base = image.convert("RGB").resize((side, side), Image.NEAREST)
    heat = item.saliency.reshape(grid, grid).astype(np.float64)
    level = (255 * (0.2 + 0.8 * heat / max(float(heat.max()), 1e-12))).astype(np.uint8)
    mask = Image.fromarray(level, mode="L").resize((side, side), Image.NEAREST)
    pic = Image.composite(base, Image.new("RGB", (side, side), "black"), mask)
    canvas = Image.new("RGB", (side, side + 36), "white")
    canvas.paste(pic, (0, 36))
    draw = ImageDraw.Draw(canvas)
    cell = side / grid
    if grid <= 8:
        for i, share in enumerate(item.saliency):
            x, y = (i % grid) * cell + 2, 36 + (i // grid) * cell + 2
            draw.rectangle([x, y, x + 26, y + 11], fill="black")
            draw.text((x + 1, y), f"{float(share):.2f}", fill="white")
    if item.box:
        sx, sy = side / item.image_size[0], side / item.image_size[1]
        x0, y0, x1, y1 = item.box
        draw.rectangle([x0 * sx, 36 + y0 * sy, x1 * sx - 1, 36 + y1 * sy - 1], outline=(0, 255, 255), width=2)
    draw.text((4, 2), item.question[:48], fill="black")
    draw.text((4, 18), f"gold answer: {item.answer}", fill="black")  # the corpus's, not the teacher's reply
    return canvas


def saliency_pictures(teacher: Path, test_json: Path, root: Path, layer: int, out: Path, pictures: int) -> dict:
    """Teacher saliency on held-out images: mass in the asked-about object's box, and overlays."""
    model, processor = load_model(teacher), load_parts(teacher)
    items = teacher_saliency(model, processor, str(test_json), str(root), layer, limit=200)
    with_box = [it for it in items if it.box]
    masses = [box_mass(it.saliency, it.image_size, it.box) for it in with_box]
    peaks = [peak_in_box(it.saliency, it.image_size, it.box) for it in with_box]
    tokens = [object_patch_mass(it.saliency, it.image_size, it.box) for it in with_box]
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for i, it in enumerate(with_box[:pictures]):
        with Image.open(root / it.sample.image_path) as im:
            path = out / f"saliency_{i:02d}.png"
            overlay(im, it).save(path)
            files.append(str(path))
    n = max(len(masses), 1)
    return {"layer": layer, "samples": len(masses), "pictures": files,
            "mean_mass_in_box": round(sum(m for m, _ in masses) / n, 4),
            "mean_box_share": round(sum(s for _, s in masses) / n, 4),
            "mean_mass_on_object_patches": round(sum(m for m, _ in tokens) / n, 4),
            "mean_object_patch_share": round(sum(s for _, s in tokens) / n, 4),
            "peak_in_box_rate": round(sum(hit for hit, _ in peaks) / n, 4),
            "peak_in_box_chance": round(sum(c for _, c in peaks) / n, 4)}
