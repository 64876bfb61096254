"""Pretrain a tiny vision tower on per-patch labels: the demo's stand-in for a pretrained SigLIP.

Real Align-TI teachers and students start from a pretrained vision encoder (SigLIP, CLIP); the
demo has no hub, and a tower trained from scratch only through the answer tokens learns too
slowly on a laptop (docs/results.md: about 40% held-out after 4 CPU minutes). So the demo first
trains the tower alone, with linear heads on the features LLaVA feeds the projector, to tell each
patch's object colour and shape (and, optionally, its image quadrant) from the shapes corpus's
object annotations (fast: no language model, a few vision tokens). The heads are then dropped and the same tower is
copied into the teacher and into every student, as a shared pretrained SigLIP would be.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from alignti.data.corpus import Reject, load_image, read_corpus
from alignti.data.shapes_render import COLORS, POSITIONS, SHAPES
from alignti.errors import AlignTIError
from alignti.data.boxes import patch_overlap
from alignti.models.family import ModelParts, load_parts
from alignti.models.loading import load_model
from alignti.progress import progress_bar

# Head name -> classes; class 0 of colour and shape is "no object in this patch".
HEADS = {"color": 1 + len(COLORS), "shape": 1 + len(SHAPES), "quadrant": len(POSITIONS)}


def patch_labels(objects: list[dict], image_size: int, grid: int) -> dict[str, torch.Tensor]:
    """Per-patch targets of one shapes record (`objects`: its `objects` field).

    Patch i (row-major on a grid x grid layout) is labelled with the object whose box overlaps
    it (objects never share a quadrant, so at most one does) and with the quadrant it lies in.
    Returns {head: int64 [grid * grid]}.
    """
    color = torch.zeros(grid * grid, dtype=torch.long)
    shape = torch.zeros(grid * grid, dtype=torch.long)
    for o in objects:
        touched = torch.from_numpy(patch_overlap(grid, (image_size, image_size), tuple(o["box"])) > 0)
        color[touched] = 1 + list(COLORS).index(o["color"])
        shape[touched] = 1 + list(SHAPES).index(o["shape"])
    # quadrant of each patch centre: column half + 2 * row half
    half = (torch.arange(grid) * 2 + 1 >= grid).long()  # [grid]: centre in the right/bottom half
    quadrant = (half[None, :] + 2 * half[:, None]).reshape(-1)
    return {"color": color, "shape": shape, "quadrant": quadrant}


def shapes_tower_data(corpus: str, image_root: str, processor: ModelParts,
                      grid: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Pixels and per-patch labels of every record of a shapes corpus:
    (pixel_values [N, 3, S, S], {head: int64 [N, grid * grid]})."""
    pixels, labels = [], {name: [] for name in HEADS}
    for row in read_corpus(corpus):
        if isinstance(row, Reject) or "objects" not in row.extra:
            raise AlignTIError(f"{corpus}: not a shapes corpus (record {getattr(row, 'source_id', '?')})")
        loaded = load_image(Path(image_root) / row.image)
        if isinstance(loaded, Reject):
            raise AlignTIError(f"{corpus}: unreadable image {row.image}")
        pixels.append(processor.image_processor(loaded.image, return_tensors="pt")["pixel_values"])
        for name, t in patch_labels(row.extra["objects"], loaded.image.width, grid).items():
            labels[name].append(t)
    return torch.cat(pixels), {name: torch.stack(ts) for name, ts in labels.items()}


@dataclass(frozen=True)
class TowerResult:
    steps: int
    accuracy: dict[str, float]  # per head, on the last 10 batches


def tower_features(model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """The tower's output as SigLIP itself is trained (after its post-layernorm) -> [B, n_v, H_v].

    The heads read this rather than the pre-norm features LLaVA projects: in the demo's
    calibration the teacher then learned about twice as fast (docs/results.md).
    """
    return model.model.vision_tower(pixel_values=pixel_values).last_hidden_state


def pretrain_tower(model: nn.Module, pixel_values: torch.Tensor, labels: dict[str, torch.Tensor], steps: int,
                   lr: float = 1e-3, batch_size: int = 32, seed: int = 0) -> TowerResult:
    """Train `model`'s vision tower in place with one linear head per label (heads discarded).

    pixel_values: [N, 3, S, S]; labels: {head: int64 [N, n_v]} with HEADS' class counts.
    """
    torch.manual_seed(seed)
    tower = model.model.vision_tower.train()
    hidden = tower.config.hidden_size
    heads = nn.ModuleDict({name: nn.Linear(hidden, HEADS[name]) for name in labels})
    opt = torch.optim.AdamW([*tower.parameters(), *heads.parameters()], lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    recent: list[dict[str, float]] = []
    for _ in progress_bar(range(steps), desc="vision tower", unit="step"):
        idx = torch.randint(0, pixel_values.shape[0], (batch_size,), generator=gen)
        feats = tower_features(model, pixel_values[idx])  # [b, n_v, H_v]
        logits = {name: head(feats) for name, head in heads.items()}
        loss = sum(nn.functional.cross_entropy(logits[n].flatten(0, 1), labels[n][idx].flatten()) for n in heads)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        recent = (recent + [{n: (logits[n].argmax(-1) == labels[n][idx]).float().mean().item() for n in heads}])[-10:]
    tower.eval()
    return TowerResult(steps, {n: round(sum(r[n] for r in recent) / len(recent), 4) for n in heads})


def copy_tower(source: nn.Module, model_dirs: list[Path]) -> None:
    """Overwrite the vision tower of each saved model with `source`'s (same tower config needed)."""
    state = source.model.vision_tower.state_dict()
    for d in model_dirs:
        model = load_model(d)
        model.model.vision_tower.load_state_dict(state)
        model.save_pretrained(d)  # the processor files in `d` are unchanged


def pretrain_demo_tower(model_dir: Path, corpus: Path, root: Path, steps: int,
                        seed: int) -> tuple[torch.nn.Module, dict]:
    """The teacher init with its vision tower pretrained on the corpus's object annotations."""
    model, processor = load_model(model_dir), load_parts(model_dir)
    vision = model.config.vision_config
    pixels, labels = shapes_tower_data(str(corpus), str(root), processor, vision.image_size // vision.patch_size)
    labels = {k: labels[k] for k in ("color", "shape")}  # a quadrant head did not help (docs/results.md)
    result = pretrain_tower(model, pixels, labels, steps, seed=seed)
    print(f"vision tower: {steps} steps, per-patch accuracy {result.accuracy}", flush=True)
    return model, {"steps": steps, "accuracy": result.accuracy}
