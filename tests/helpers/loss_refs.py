"""Float64 brute-force references for the loss tests, written independently of alignti.

The references build the (k+1) buckets with explicit Python loops over ids and vocabulary in
numpy float64 (softmax by exp/sum, tail mass by summing probabilities, never logsumexp masks),
so they share no code path with `alignti.distill.kl`. `sft_of` is the objective's own SFT path.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from alignti.data.encode import IGNORE_INDEX
from alignti.distill.losses import sft_rows_loss

DIVS = ("fkl", "rkl", "jsd")


def sft_of(logits: torch.Tensor, labels: torch.Tensor, chunk_size: int = 1024):
    """L_sft of [B, T, V] logits and [B, T] labels as the objective computes it: the rows whose next
    token is labelled, gathered chunk by chunk through row_index, into `sft_rows_loss`."""
    b, t, v = logits.shape
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX).reshape(-1)
    rows = (targets != IGNORE_INDEX).nonzero().squeeze(-1)
    return sft_rows_loss(logits.reshape(b * t, v), targets[rows], chunk_size, row_index=rows)


# ----------------------------------------------------------------- float64 references
def softmax64(x) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    e = np.exp(x - x.max())
    return e / e.sum()


def div64(p, q, divergence: str, beta: float = 0.5) -> float:
    """Divergence between two finite distributions given as lists, by explicit loops."""
    if divergence == "rkl":
        p, q = q, p
    if divergence in ("fkl", "rkl"):
        return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0)
    m = [beta * pi + (1 - beta) * qi for pi, qi in zip(p, q)]
    kl_pm = sum(pi * math.log(pi / mi) for pi, mi in zip(p, m) if pi > 0)
    kl_qm = sum(qi * math.log(qi / mi) for qi, mi in zip(q, m) if qi > 0)
    return beta * kl_pm + (1 - beta) * kl_qm


def buckets64(student_row, ids, logprobs, tail: str):
    """Teacher and student bucket lists for one row (ids outside [0, V) go to the tail)."""
    q_full = softmax64(student_row)
    v = len(q_full)
    head = [(int(i), math.exp(float(lp))) for i, lp in zip(ids, logprobs) if 0 <= int(i) < v]
    p = [pi for _, pi in head]
    q = [float(q_full[i]) for i, _ in head]
    if tail == "renorm":
        return [x / sum(p) for x in p], [x / sum(q) for x in q]
    in_head = {i for i, _ in head}
    rest = [j for j in range(v) if j not in in_head]
    if rest:
        p.append(max(0.0, 1.0 - sum(p)))
        q.append(float(sum(q_full[j] for j in rest)))
    return p, q


def topk_ref(student, ids, logprobs, divergence, tail="bucket", beta=0.5) -> np.ndarray:
    s, i, lp = (t.detach().double().numpy() for t in (student, ids, logprobs))
    return np.array([div64(*buckets64(s[n], i[n], lp[n], tail), divergence, beta) for n in range(len(s))])


def full_ref(student, teacher, divergence, beta=0.5) -> np.ndarray:
    s, t = student.detach().double().numpy(), teacher.detach().double().numpy()
    return np.array([div64(list(softmax64(t[n])), list(softmax64(s[n])), divergence, beta) for n in range(len(s))])


def teacher_topk(teacher_logits: torch.Tensor, k: int):
    lp = torch.log_softmax(teacher_logits.double(), -1)
    vals, ids = lp.topk(k, -1)
    return ids, vals.float()


def rand(*shape, scale=2.0, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale
