"""The Align-TI loss terms as (sum, count) pairs, their combination, and the loss config.

Every term returns `(sum, count)`: fp32 scalar tensors on the logits' device, `sum` attached to
the graph. The training step adds sums and counts over micro-batches (and ranks) and divides
once by the global count (`combine`), so a mean is exact under gradient accumulation and data
parallelism whatever the micro-batch sizes (torchtitan's convention). A term with nothing to
score returns `(0, 0)` with a zero, NaN-free gradient. The row terms take logits rows, or hidden
rows plus `head=` (the fused LM head: applied per chunk inside the recomputed chunk,
`kl.chunked_row_sum`).

Terms (docs/method.md; the top-k KL itself is in `alignti.distill.kl`):
- `sft_rows_loss`: cross-entropy of the labelled rows (count: rows).
- `kd_loss`:   top-k KL at response rows (count: rows).
- `sft_kd_loss`: both of those in one pass over the response rows.
- `iva_loss`:  saliency-weighted top-k KL at salient vision rows (count: samples).
- `iva_attention_loss`: KL(teacher saliency || student attention) (count: samples).
- `tpa_loss`:  candidate-weighted top-k KL at ribbon candidate rows (count: steps).
- "ground" (not a distillation term): `iva_attention_loss` against box annotations
  (`alignti.distill.grounding`; count: samples with a target).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F

from alignti.distill.config import TPA_WEIGHTINGS
from alignti.distill.kl import Head, check_topk_rows, chunked_row_sum, chunked_topk_kl, topk_kl_rows


SumCount = tuple[torch.Tensor, torch.Tensor]


def _count(value: int | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(value, dtype=torch.float32, device=like.device).reshape(())


def _ce_rows(rows: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """rows: [c, V] fp32, targets: [c] -> [c] cross-entropy."""
    return F.cross_entropy(rows, targets, reduction="none")


def sft_rows_loss(logits_rows: torch.Tensor, targets: torch.Tensor, chunk_size: int = 1024, *,
                  row_index: torch.Tensor | None = None, head: Head | None = None) -> SumCount:
    """Summed cross-entropy of pre-selected rows, and their number (the distill step's L_sft).

    logits_rows: [N, V] any float dtype, the logits of the positions whose next token is
    labelled (already gathered, e.g. only the response rows of a ribbon), or [M, V] with
    row_index [N] long selecting them; with `head` (the fused LM head, `kl.chunked_row_sum`)
    hidden states [N, H] / [M, H] instead. targets: [N] int, the labelled next tokens. Chunked,
    upcast to fp32 and recomputed in backward (`kl.chunked_row_sum`); no host sync. N = 0 -> (0, 0)
    with a zero, NaN-free gradient.
    """
    n = logits_rows.shape[0] if row_index is None else row_index.shape[0]
    if logits_rows.dim() != 2 or targets.shape != (n,):
        raise ValueError(f"sft_rows_loss: logits {tuple(logits_rows.shape)} and targets "
                           f"{tuple(targets.shape)} disagree")
    total = chunked_row_sum(_ce_rows, logits_rows, (targets.long(),), row_index=row_index, chunk_size=chunk_size,
                            head=head)
    return total, _count(n, logits_rows)


def kd_loss(
    student_logits_rows: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    *,
    row_index: torch.Tensor | None = None,
    chunk_size: int = 1024,
    divergence: str = "fkl",
    beta: float = 0.5,
    tail: str = "bucket",
    head: Head | None = None,
) -> SumCount:
    """(sum over response rows of KL_k(teacher || student), N).

    student_logits_rows: [N, V] (or [M, V] with row_index [N] long, e.g. the [B*T, V] view of
    the full logits and the flat positions of the response rows), or hidden states with `head`
    (as in `sft_rows_loss`); teacher_ids, teacher_logprobs: [N, k]. Divergence options as in
    `kl.topk_kl_rows`.
    """
    total, _ = chunked_topk_kl(student_logits_rows, teacher_ids, teacher_logprobs, row_index=row_index,
                               chunk_size=chunk_size, divergence=divergence, beta=beta, tail=tail, head=head)
    return total, _count(teacher_ids.shape[0], student_logits_rows)


def _sft_kd_rows(logits: torch.Tensor, targets: torch.Tensor, ids: torch.Tensor, lps: torch.Tensor,
                 **div: Any) -> torch.Tensor:
    """logits [c, V] fp32 -> [c, 2]: cross-entropy and top-k KL of each row."""
    return torch.stack([_ce_rows(logits, targets), topk_kl_rows(logits, ids, lps, **div)], -1)


def sft_kd_loss(
    rows: torch.Tensor,
    targets: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    *,
    row_index: torch.Tensor | None = None,
    chunk_size: int = 1024,
    head: Head | None = None,
    **div: Any,
) -> tuple[SumCount, SumCount]:
    """(`sft_rows_loss`, `kd_loss`) of the same response rows in one pass over them.

    Arguments as in those two; div: divergence, beta, tail as in `kl.topk_kl_rows`. With the
    fused head this applies the head to each chunk once (and once more in backward) for both
    terms, instead of once per term.
    """
    n = rows.shape[0] if row_index is None else row_index.shape[0]
    check_topk_rows(n, teacher_ids, teacher_logprobs)
    if targets.shape != (n,):
        raise ValueError(f"sft_kd_loss: {n} rows but targets {tuple(targets.shape)}")
    fn = functools.partial(_sft_kd_rows, **div)
    total = chunked_row_sum(fn, rows, (targets.long(), teacher_ids, teacher_logprobs), row_index=row_index,
                            chunk_size=chunk_size, head=head)  # [2]
    count = _count(n, rows)
    return (total[0], count), (total[1], count)


def iva_weights(
    saliency_weights: torch.Tensor, sample_index: torch.Tensor, num_samples: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Saliency renormalised within each sample, and the number of samples having rows.

    saliency_weights: [M] (w at each sample's P salient positions), sample_index: [M] int in
    [0, num_samples) -> (w~ fp32 [M], count fp32 scalar). A sample whose weights sum to 0 gets
    uniform weights over its rows (so it still sums to 1).
    """
    w = saliency_weights.float()
    idx = sample_index.long()
    denom = torch.zeros(num_samples, dtype=torch.float32, device=w.device).index_add_(0, idx, w)
    rows = torch.zeros(num_samples, dtype=torch.float32, device=w.device).index_add_(0, idx, torch.ones_like(w))
    d, n = denom[idx], rows[idx]
    w_tilde = torch.where(d > 0, w / torch.where(d > 0, d, 1.0), 1.0 / n.clamp_min(1.0))
    return w_tilde, (rows > 0).sum().float()


def iva_loss(
    student_rows: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    saliency_weights: torch.Tensor,
    sample_index: torch.Tensor,
    num_samples: int,
    *,
    row_index: torch.Tensor | None = None,
    chunk_size: int = 1024,
    divergence: str = "fkl",
    beta: float = 0.5,
    tail: str = "bucket",
    head: Head | None = None,
) -> SumCount:
    """(sum over samples of sum_{v in P} w~_v KL_k(row v), number of samples having rows).

    student_rows: [M, V] student logits at the salient vision positions of all samples
    (or a larger [*, V] with row_index [M]), or hidden states with `head` (as in
    `sft_rows_loss`); teacher_ids, teacher_logprobs: [M, k_v];
    saliency_weights: [M] teacher saliency w at those positions; sample_index: [M] which sample
    each row belongs to, in [0, num_samples). w~ = w renormalised over each sample's rows.
    """
    m = teacher_ids.shape[0]
    if saliency_weights.shape != (m,) or sample_index.shape != (m,):
        raise ValueError(f"iva_loss: {m} rows but saliency {tuple(saliency_weights.shape)}, "
                           f"sample_index {tuple(sample_index.shape)}")
    w_tilde, count = iva_weights(saliency_weights, sample_index, num_samples)
    total, _ = chunked_topk_kl(student_rows, teacher_ids, teacher_logprobs, weights=w_tilde, row_index=row_index,
                               chunk_size=chunk_size, divergence=divergence, beta=beta, tail=tail, head=head)
    return total, count.to(total.device)


def iva_attention_loss(teacher_saliency: torch.Tensor, student_attention: torch.Tensor, *, eps: float = 1e-8) -> SumCount:
    """(sum over samples of KL(w || a), S): the `iva_target=attention` variant.

    teacher_saliency: [S, n_v] the cached w; student_attention: [S, n_v] the student's
    instruction-to-vision attention from the same probe. Both are L1-normalised per sample here
    (fp16 caches do not sum to exactly 1); a is floored at `eps` inside the log so a position
    the student ignores gives a finite penalty. Pad unused positions with 0 in both.
    """
    if teacher_saliency.shape != student_attention.shape or teacher_saliency.dim() != 2:
        raise ValueError(f"iva_attention_loss: saliency {tuple(teacher_saliency.shape)} and attention "
                           f"{tuple(student_attention.shape)} disagree")
    w = teacher_saliency.float()
    w = w / w.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    a = student_attention.float()
    a = a / a.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    log_w = torch.where(w > 0, w, 1.0).log()
    kl = (w * (log_w - a.clamp_min(eps).log())).sum()
    return kl, _count(w.shape[0], kl)


def tpa_weights(cand_logprobs: torch.Tensor, weighting: str = "teacher",
                student_scores: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Candidate weights u [N_c, d] fp32 and the number of steps with any candidate.

    cand_logprobs: [N_c, d] teacher log p_T(a_j | y_<=t). "teacher": u = p_T(a_j) / sum_j p_T(a_j)
    (a softmax of the log-probs); "uniform": 1/d; "student": u = p_S(a_j) / sum_j p_S(a_j) =
    softmax_j(student_scores), student_scores [N_c, d] being the student's logits (or log-probs:
    the log-sum-exp cancels) of a_j at the ground-truth row of step t, detached here so u is a
    constant. A slot with log-prob -inf is padding whatever the weighting: weight 0, and u is
    renormalised over the real candidates; a step with none has u = 0 and is not counted.
    """
    if weighting not in TPA_WEIGHTINGS:
        raise ValueError(f"unknown tpa_weighting {weighting!r}; choose one of {', '.join(TPA_WEIGHTINGS)}")
    if (weighting == "student") != (student_scores is not None):
        raise ValueError("tpa_weighting 'student' needs student_scores, and only it takes them")
    lp = cand_logprobs.float()
    if student_scores is not None and student_scores.shape != lp.shape:
        raise ValueError(f"tpa_weights: student_scores {tuple(student_scores.shape)} but candidates "
                         f"{tuple(lp.shape)}")
    real = torch.isfinite(lp)
    has_any = real.any(-1, keepdim=True)
    if weighting == "teacher":
        scores = lp
    elif weighting == "student":
        scores = student_scores.detach().float()
    else:
        scores = torch.zeros_like(lp)
    scores = torch.where(real, scores, float("-inf"))
    u = torch.softmax(torch.where(has_any, scores, 0.0), -1)  # finite input for empty steps
    u = torch.where(has_any & real, u, 0.0)
    return u, has_any.sum().float()


def tpa_loss(
    student_rows: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    cand_logprobs: torch.Tensor,
    *,
    weighting: str = "teacher",
    student_scores: torch.Tensor | None = None,
    row_index: torch.Tensor | None = None,
    chunk_size: int = 1024,
    divergence: str = "fkl",
    beta: float = 0.5,
    tail: str = "bucket",
    head: Head | None = None,
) -> SumCount:
    """(sum over steps t of sum_j u_{t,j} KL_k(row (t, j)), N_c).

    student_rows: [N_c*d, V] student logits at the ribbon candidate positions, step-major
    (row t*d + j is candidate j of step t), or a larger [*, V] with row_index [N_c*d], or
    hidden states with `head` (as in `sft_rows_loss`);
    teacher_ids, teacher_logprobs: [N_c*d, k_t] the teacher's top-k_t of p_T(. | y_<t, a_j);
    cand_logprobs: [N_c, d] log p_T(a_j | y_<t). Weights u from `tpa_weights` (student_scores
    [N_c, d] only with weighting "student").
    """
    n_c, d = cand_logprobs.shape
    if teacher_ids.shape[0] != n_c * d:
        raise ValueError(f"tpa_loss: {n_c} steps x {d} candidates but {teacher_ids.shape[0]} teacher rows")
    u, count = tpa_weights(cand_logprobs, weighting, student_scores)
    total, _ = chunked_topk_kl(student_rows, teacher_ids, teacher_logprobs, weights=u.reshape(-1),
                               row_index=row_index, chunk_size=chunk_size, divergence=divergence, beta=beta,
                               tail=tail, head=head)
    return total, count.to(total.device)


def combine(
    terms: dict[str, SumCount],
    weights: dict[str, float],
    global_counts: dict[str, float | torch.Tensor] | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """total = sum_name weights[name] * sum_name / max(count_name, 1), and detached per-term means.

    terms: name -> (sum, count) from this micro-batch; weights: name -> weight (a term missing
    from weights has weight 0 and is only reported); global_counts: name -> the count summed
    over every micro-batch of the optimizer step (and every rank), used instead of the local
    count. Summing `total` over micro-batches then gives the exact global mean. Under DDP,
    which averages gradients over ranks, pass global counts divided by the world size (or scale
    the loss by it). A weighted term that was not computed is a ValueError.
    """
    missing = [n for n, w in weights.items() if w != 0 and n not in terms]
    if missing:
        raise ValueError(f"loss terms {missing} have non-zero weight but were not computed")
    total: torch.Tensor | None = None
    means: dict[str, torch.Tensor] = {}
    for name, (s, c) in terms.items():
        count = global_counts[name] if global_counts is not None and name in global_counts else c
        mean = s / torch.clamp(torch.as_tensor(count, dtype=torch.float32, device=s.device), min=1.0)
        means[name] = mean.detach()
        w = weights.get(name, 0.0)
        if w != 0:
            total = w * mean if total is None else total + w * mean
    if total is None:
        raise ValueError("no loss term has a non-zero weight")
    return total, means
