"""Data order and learning-rate schedule of `alignti distill`: which examples form each
micro-batch and step, which process takes which, and the lr factor per step. Pure functions of
their arguments (never of the process count, except `rank_share`), so a run resumes exactly.
"""

from __future__ import annotations

import math

import numpy as np

# Micro-batches per length-grouping window: samples are sorted by length inside windows of
# batch_size * GROUP_WINDOW (after a seeded shuffle), then the micro-batch order is shuffled.
GROUP_WINDOW = 32


def epoch_micro_batches(lengths: list[int], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """One epoch's micro-batches (lists of example indices): seeded shuffle, length grouping
    inside windows of GROUP_WINDOW micro-batches, shuffled micro-batch order. Depends only on
    (lengths, batch_size, seed, epoch), never on the number of processes."""
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths)).tolist()
    window = batch_size * GROUP_WINDOW
    batches: list[list[int]] = []
    for w in range(0, len(order), window):
        chunk = sorted(order[w:w + window], key=lambda i: lengths[i])  # stable: ties keep shuffled order
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def split_steps(micro: list[list[int]], per_step: int) -> list[list[list[int]]]:
    """Consecutive groups of `per_step` micro-batches (the last may be shorter)."""
    return [micro[i:i + per_step] for i in range(0, len(micro), per_step)]


def rank_share(step_micro: list[list[int]], rank: int, world: int, even: bool = False) -> list[tuple[list[int], bool]]:
    """This process's (indices, live) micro-batches of one step: every world-th one from `rank`.

    A process left with none (a short last step) re-runs the step's first micro-batch with
    live=False (its loss is multiplied by 0), so every process joins the gradient all-reduce.
    even: every process gets the same number, ceil(len / world), padded the same way (FSDP
    gathers parameters in every forward, so every process must run as many).
    """
    mine = [(m, True) for m in step_micro[rank::world]]
    count = -(-len(step_micro) // world) if even else max(1, len(mine))
    return mine + [(step_micro[0], False)] * (count - len(mine))


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup over `warmup` steps (the first step already moves), then cosine to min_ratio."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
