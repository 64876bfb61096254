"""What a distill run trains and how: --train's parameter selection, AdamW, the warmup + cosine schedule."""

from __future__ import annotations

import functools

import torch

from alignti.distill.config import DistillConfig
from alignti.distill.order import lr_factor
from alignti.errors import AlignTIError
from alignti.models.family import family_of


def freeze(model: torch.nn.Module, train: str) -> list[str]:
    """Set requires_grad per --train (vision tower frozen unless `full`); names of trainable params.
    The model's family says which parameters are the tower and the projector (Qwen-VL: the merger)."""
    names = []
    family = family_of(model.config)
    for name, p in model.named_parameters():
        part = family.part_of(name)
        p.requires_grad_(train == "full" or (part != "vision" and train in (part, "all")))
        if p.requires_grad:
            names.append(name)
    if not names:
        raise AlignTIError(f"--train {train}: the student has no such parameters")
    return names


def build_optimizer(model: torch.nn.Module, cfg: DistillConfig) -> torch.optim.AdamW:
    """AdamW; no weight decay on vectors (biases, norms)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=(0.9, cfg.adam_beta2), eps=1e-8)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: DistillConfig, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup (--warmup-steps, else --warmup-ratio of the run), then cosine to --min-lr-ratio."""
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else round(cfg.warmup_ratio * total_steps)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, functools.partial(lr_factor, warmup=warmup, total=total_steps, min_ratio=cfg.min_lr_ratio))
