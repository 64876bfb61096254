"""Top-k KL with a tail bucket, and its chunked, recomputed-in-backward driver.

Every distillation term compares a teacher distribution known only through its top-k ids and
log-probs with the student's full logits. Both are collapsed onto the same k+1 buckets: the k
teacher ids and one tail bucket holding everything else (docs/method.md):

    teacher: p_i = exp(logprob_i),           r = max(0, 1 - sum_i p_i)
    student: log q_i = log_softmax(logits)[id_i],
             log s   = logsumexp(logits with the k ids masked to -inf) - logsumexp(logits)

`log s` is computed exactly from the masked logits, never as `log(1 - sum q)`, which cancels
catastrophically when the student puts almost all its mass on the k ids.

Conventions:
- Ids outside `[0, V)` (a teacher vocabulary padded beyond the student's, e.g. 152064 vs
  151936, or negative padding ids) are dropped from the head on both sides: their teacher mass
  lands in `r` and the student never has mass there. `padded_teacher_mass` reports that mass so
  the trainer can warn once.
- If the k valid ids cover the whole student vocabulary the tail bucket is empty on both sides
  and is dropped (the teacher's `r` is then only rounding).
- Duplicate ids within a row are not expected (a top-k never has them); with duplicates the
  head counts that bucket twice.
- `0 * log 0 = 0` everywhere: empty buckets contribute nothing, in value and in gradient.
- Computation is in fp32 whatever the input dtype; rows come out as fp32.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
from torch.utils.checkpoint import checkpoint

from alignti.distill.config import DIVERGENCES, TAILS
# Teacher mass on padded ids above which the trainer should warn (once).
PADDED_MASS_WARN = 1e-6
# Under rkl a bucket the teacher rounds to zero (fp16 cache, a tail clamped at 0) would make
# KL(q || p) infinite wherever the student has mass. Teacher bucket probabilities are floored
# at this value for rkl only, turning that into a large finite penalty.
RKL_TEACHER_FLOOR = 1e-10
_NEG_INF = float("-inf")
# The LM head as the fused path takes it: hidden rows [c, H] -> logits [c, V].
Head = Callable[[torch.Tensor], torch.Tensor]


def check_divergence(divergence: str, beta: float, tail: str) -> None:
    """ValueError for an unknown divergence or tail or a beta outside [0, 1] (a user's options are
    checked where they are parsed, `distill.config.LossConfig`; this guards direct callers, once per
    call, not per chunk)."""
    if divergence not in DIVERGENCES or tail not in TAILS or not 0.0 <= beta <= 1.0:
        raise ValueError(f"divergence {divergence!r} (of {DIVERGENCES}), tail {tail!r} (of {TAILS}), beta {beta}")


def check_topk_rows(n: int, teacher_ids: torch.Tensor, teacher_logprobs: torch.Tensor) -> None:
    """ValueError unless teacher_ids and teacher_logprobs are both [n, k]."""
    if teacher_ids.shape != teacher_logprobs.shape or teacher_ids.dim() != 2 or teacher_ids.shape[0] != n:
        raise ValueError(f"top-k KL shapes disagree: {n} student rows, ids {tuple(teacher_ids.shape)}, "
                           f"logprobs {tuple(teacher_logprobs.shape)}")


def padded_teacher_mass(teacher_ids: torch.Tensor, teacher_logprobs: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Teacher probability on ids outside `[0, vocab_size)`, per row.

    teacher_ids: [N, k] int, teacher_logprobs: [N, k] -> fp32 [N]. The trainer warns once when
    `.max()` exceeds `PADDED_MASS_WARN`: that mass is moved to the tail bucket.
    """
    outside = (teacher_ids < 0) | (teacher_ids >= vocab_size)
    return torch.where(outside, teacher_logprobs.float().exp(), 0.0).sum(-1)


def _first_valid(ids: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """bool [N, k]: valid and not a repeat of an earlier valid id of its row (a top-k has no
    repeats; this keeps the logsumexp of the head exact if one ever had)."""
    same = (ids[:, :, None] == ids[:, None, :]) & valid[:, None, :]  # [N, k, k]
    return valid & ~same.tril(-1).any(-1)


class _TailBuckets(torch.autograd.Function):
    """Student log-probs of the k head buckets and of the tail, with a hand-written backward.

    forward(logits fp32 [N, V], ids long [N, k], valid bool [N, k], first bool [N, k] (from
    `_first_valid`), tail_present bool [N]) -> (lq_head [N, k] = log_softmax(logits) at the ids,
    arbitrary where not valid; log_s [N] = log of the student's mass outside the valid ids, -inf
    where the tail is absent).

    Why not autograd: the tail needs a masked copy of the [N, V] logits and two logsumexps, whose
    autograd graph keeps and re-reads several [N, V] tensors; here the forward makes one [N, V+1]
    buffer and the backward one more. Both logsumexps are exact (each takes its own maximum):
    lse_t over the masked buffer, then lse = logaddexp(lse_t, logsumexp of the distinct head
    logits). The gradient, with t_v = exp(l_v - lse_t), s = exp(log_s), G = sum_i g_i + g_s:
        v outside the ids: t_v * (g_s - G * s);   v = id_i: sum of g_i over its repeats - G * p_v,
    since d lse / d l_v = p_v = s * t_v and d lse_t / d l_v = t_v off the ids. t_v <= 1 off the
    ids; at the ids it may overflow but is overwritten.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, ids: torch.Tensor, valid: torch.Tensor, first: torch.Tensor,
                tail_present: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n, v = logits.shape
        col = torch.where(valid, ids, v)  # invalid ids land in an extra column, masking nothing
        buf = logits.new_empty(n, v + 1)
        buf[:, :v] = logits
        buf[:, v] = _NEG_INF
        buf.scatter_(1, col, _NEG_INF)  # scattering the same value twice is deterministic
        top = buf.amax(-1, keepdim=True)
        top = torch.where(torch.isfinite(top), top, 0.0)  # an absent tail: exp(-inf) = 0, no NaN
        lse_t = buf.sub_(top).exp_().sum(-1).log_() + top[:, 0]  # [N]; in place: the buffer is ours
        head = logits.gather(1, torch.where(valid, ids, 0))  # [N, k]
        lse_head = torch.logsumexp(torch.where(first, head, _NEG_INF), -1)
        lse = torch.where(tail_present, torch.logaddexp(lse_t, lse_head), lse_head)
        lq_head, log_s = head - lse[:, None], lse_t - lse
        ctx.save_for_backward(logits, col, valid, tail_present, lse_t, lq_head, log_s)
        return lq_head, log_s

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_head: torch.Tensor, g_s: torch.Tensor):
        logits, col, valid, tail_present, lse_t, lq_head, log_s = ctx.saved_tensors
        n, v = logits.shape
        g_head = torch.where(valid, g_head, 0.0)
        g_s = torch.where(tail_present, g_s, 0.0)
        total = g_head.sum(-1) + g_s  # G [N]
        grad = logits.new_empty(n, v + 1)
        torch.sub(logits, lse_t[:, None], out=grad[:, :v])
        grad[:, v] = 0.0
        grad.exp_().mul_((g_s - total * log_s.exp())[:, None])
        grad.scatter_(1, col, -total[:, None] * lq_head.exp())  # the ids: -G p (repeats write one value)
        grad.scatter_add_(1, col, g_head)
        return grad[:, :v], None, None, None, None


def _buckets_tail(logits: torch.Tensor, ids: torch.Tensor, lps: torch.Tensor, valid: torch.Tensor):
    """(k+1)-bucket log-probs with the tail bucket. All [N, k+1]; `present` marks real buckets."""
    v = logits.shape[1]
    first = _first_valid(ids, valid)
    tail_present = first.sum(-1) < v  # [N]; False when the ids cover the vocab
    lq_head, log_s = _TailBuckets.apply(logits, ids, valid, first, tail_present)
    # r = 1 - sum p cancels when the head holds nearly all the mass; summing in float64 keeps r
    # accurate to its inputs (only [N, k] values; MPS has no float64). fp16 caches can push
    # sum p over 1: clamp.
    acc = torch.float32 if lps.device.type == "mps" else torch.float64
    r = (1.0 - torch.where(valid, lps.to(acc).exp(), 0.0).sum(-1)).clamp_min(0.0).float()  # [N]
    lp = torch.cat([torch.where(valid, lps, _NEG_INF), r.log()[:, None]], 1)
    lq = torch.cat([lq_head, log_s[:, None]], 1)
    present = torch.cat([valid, tail_present[:, None]], 1)
    return lp, lq, present


def _buckets_renorm(logits: torch.Tensor, ids: torch.Tensor, lps: torch.Tensor, valid: torch.Tensor):
    """k buckets: teacher and student each renormalised over the valid ids. All [N, k]."""
    any_valid = valid.any(-1, keepdim=True)
    # Rows with no valid id get zeros (finite) so logsumexp has a finite gradient; they have no
    # present bucket and contribute 0.
    fill = torch.where(any_valid, _NEG_INF, 0.0)
    lq_head = logits.gather(1, torch.where(valid, ids, 0)) - torch.logsumexp(logits, -1, keepdim=True)
    lq_head = torch.where(valid, lq_head, fill)
    lp_head = torch.where(valid, lps, fill)
    lse_p = torch.logsumexp(lp_head, -1, keepdim=True)
    lse_p = torch.where(torch.isfinite(lse_p), lse_p, 0.0)  # teacher rows with no finite mass
    lp = lp_head - lse_p
    lq = lq_head - torch.logsumexp(lq_head, -1, keepdim=True)
    return lp, lq, valid


def _divergence(lp: torch.Tensor, lq: torch.Tensor, present: torch.Tensor, divergence: str, beta: float) -> torch.Tensor:
    """Per-row divergence between bucket distributions. lp, lq, present: [N, B] -> [N].

    Absent buckets and zero-probability buckets contribute exactly 0; every operand is made
    finite before it meets a multiplication so no NaN reaches the gradient.
    """
    lq = torch.where(present, lq, 0.0)
    p = torch.where(present, lp.exp(), 0.0)
    q = torch.where(present, lq.exp(), 0.0)
    if divergence == "fkl":
        lp_safe = torch.where(p > 0, lp, 0.0)
        return (p * (lp_safe - lq)).sum(-1)
    if divergence == "rkl":
        lp_floor = torch.where(present, lp.clamp_min(math.log(RKL_TEACHER_FLOOR)), 0.0)
        return (q * (lq - lp_floor)).sum(-1)
    if divergence != "jsd":
        raise ValueError(f"unknown divergence {divergence!r}")
    if beta <= 0.0 or beta >= 1.0:
        # The mixture equals one side, whose weight is 0: the divergence is exactly 0.
        return (lq * 0.0).sum(-1)
    wp, wq = beta * p, (1.0 - beta) * q
    lp_m = torch.where(p > 0, lp, _NEG_INF)
    lm = torch.logaddexp(lp_m + math.log(beta), lq + math.log(1.0 - beta))  # log of the mixture
    lm = torch.where(present, lm, 0.0)
    kl_pm = wp * torch.where(wp > 0, torch.where(p > 0, lp, 0.0) - lm, 0.0)
    kl_qm = wq * torch.where(wq > 0, lq - lm, 0.0)
    return (kl_pm + kl_qm).sum(-1)


def topk_kl_rows(
    student_logits: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    *,
    divergence: str = "fkl",
    beta: float = 0.5,
    tail: str = "bucket",
) -> torch.Tensor:
    """Per-row divergence between the teacher's and the student's (k+1)-bucket distributions.

    student_logits: [N, V] any float dtype (upcast to fp32 whole: use `chunked_topk_kl` for
    large N x V); teacher_ids: [N, k] int; teacher_logprobs: [N, k] float, log-softmax of the
    teacher's logits at those ids. Returns fp32 [N].

    divergence: "fkl" = KL(teacher || student) (default), "rkl" = KL(student || teacher),
    "jsd" = generalised Jensen-Shannon with mixture m = beta*p + (1-beta)*q:
    JSD = beta*KL(p || m) + (1-beta)*KL(q || m); 0 at beta in {0, 1}, symmetric in (p, q) at
    beta = 0.5, bounded by the binary entropy H(beta) <= log 2.
    tail: "bucket" = k+1 buckets with the exact tail (default); "renorm" = teacher top-k
    renormalised to sum 1, the student renormalised over the same ids, the tail ignored.
    """
    if student_logits.dim() != 2 or teacher_ids.shape != teacher_logprobs.shape or teacher_ids.dim() != 2 \
            or teacher_ids.shape[0] != student_logits.shape[0]:
        raise ValueError(f"top-k KL shapes disagree: logits {tuple(student_logits.shape)}, ids "
                           f"{tuple(teacher_ids.shape)}, logprobs {tuple(teacher_logprobs.shape)}")
    logits = student_logits.float()
    ids = teacher_ids.long()
    lps = teacher_logprobs.float()
    valid = (ids >= 0) & (ids < logits.shape[-1])
    build = {"bucket": _buckets_tail, "renorm": _buckets_renorm}[tail]
    lp, lq, present = build(logits, ids, lps, valid)
    return _divergence(lp, lq, present, divergence, beta)


def _chunk_sum(rows_fn: Callable[..., torch.Tensor], head: Head | None, src: torch.Tensor,
               index: torch.Tensor | None, weights: torch.Tensor | None, *row_args: torch.Tensor) -> torch.Tensor:
    """One chunk's `sum_n weights[n] * rows_fn(logits.float(), *row_args)[n]`: a scalar, or [T]
    when rows_fn returns [c, T]. rows = src[index]; logits = head(rows) when a head is given."""
    rows = src if index is None else src.index_select(0, index)
    # The head runs in its own dtype (and under the caller's autocast), the loss in fp32.
    logits = rows if head is None else head(rows)  # [c, V]
    values = rows_fn(logits.float(), *row_args)  # [c] or [c, T]
    if weights is not None:
        values = values * weights.float().reshape(-1, *(1,) * (values.dim() - 1))
    return values.sum(0)


def chunked_row_sum(
    rows_fn: Callable[..., torch.Tensor],
    logits: torch.Tensor,
    row_args: tuple[torch.Tensor, ...],
    *,
    row_index: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
    chunk_size: int = 1024,
    head: Head | None = None,
) -> torch.Tensor:
    """fp32 `sum_n weights[n] * rows_fn(logits_row_n [c, V] fp32, *args_n)[n]` by chunks.

    logits: [N, V] (or [M, V] with row_index [N] long selecting the N rows: gathered chunk by
    chunk, so no [N, V] copy is ever made); row_args: tensors with N leading rows; weights:
    [N] or None (1). rows_fn returns [c] (the result is a scalar) or [c, T] (T sums at once,
    sharing one pass over the rows). Each chunk is upcast to fp32 inside a non-reentrant
    checkpoint, so only one chunk's fp32 graph exists at a time and it is recomputed in
    backward: peak extra memory O(chunk_size * V).

    head (the fused LM head): `logits` is then hidden states [N, H] (or [M, H] with row_index)
    and each chunk's logits are `head(rows)` [c, V], computed inside the checkpoint and again
    in backward, so no [N, V] tensor exists in forward or backward whatever N is; the head's
    parameter gradients accumulate over chunks. head: any function [c, H] -> [c, V], e.g. the
    model's output-embedding `nn.Linear` (a tied embedding is the same weight).

    With no rows the result is an fp32 zero still attached to the graph of `logits` (and of
    the head): backward gives zero gradients, never NaN.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    n = logits.shape[0] if row_index is None else row_index.shape[0]
    # split() rather than slicing: its backward concatenates the chunk gradients once instead of
    # materialising a full-size zero gradient per chunk.
    pieces = logits.split(chunk_size) if row_index is None else None
    use_ckpt = torch.is_grad_enabled() and (logits.requires_grad or head is not None)
    total: torch.Tensor | None = None
    # No rows: one empty chunk, so the zero has rows_fn's shape and the graph of logits and head.
    for c, start in enumerate(range(0, max(n, 1), chunk_size)):
        stop = min(start + chunk_size, n)
        src = pieces[c] if pieces is not None else logits
        index = None if row_index is None else row_index[start:stop]
        w = None if weights is None else weights[start:stop]
        args = tuple(a[start:stop] for a in row_args)
        if use_ckpt:
            # Nothing random runs in a chunk: no RNG state to stash (5 KB per chunk on CPU).
            part = checkpoint(_chunk_sum, rows_fn, head, src, index, w, *args, use_reentrant=False,
                              preserve_rng_state=False)
        else:
            part = _chunk_sum(rows_fn, head, src, index, w, *args)
        total = part if total is None else total + part
    return total


def chunked_topk_kl(
    student_logits: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    *,
    weights: torch.Tensor | None = None,
    row_index: torch.Tensor | None = None,
    chunk_size: int = 1024,
    divergence: str = "fkl",
    beta: float = 0.5,
    tail: str = "bucket",
    head: Head | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum_n w_n KL_k(row n), sum_n w_n) in fp32, computed in recomputed chunks.

    student_logits: [N, V] (or [M, V] plus row_index [N] long: rows are student_logits[row_index],
    gathered per chunk), or hidden states [N, H] / [M, H] with `head` applied per chunk (the
    fused LM head, `chunked_row_sum`); teacher_ids, teacher_logprobs: [N, k]; weights: [N] float or None
    (all 1, so the count is N). Values and gradients equal `topk_kl_rows` summed, up to float
    summation order. The count is the weight sum as an fp32 tensor on the logits' device; the
    loss terms below return exact counts of their own units instead.
    """
    check_divergence(divergence, beta, tail)
    n = student_logits.shape[0] if row_index is None else row_index.shape[0]
    check_topk_rows(n, teacher_ids, teacher_logprobs)
    if weights is not None and weights.shape != (n,):
        raise ValueError(f"weights must have shape ({n},), got {tuple(weights.shape)}")
    fn = functools.partial(topk_kl_rows, divergence=divergence, beta=beta, tail=tail)
    total = chunked_row_sum(fn, student_logits, (teacher_ids, teacher_logprobs), row_index=row_index,
                            weights=weights, chunk_size=chunk_size, head=head)
    device = student_logits.device
    count = torch.tensor(float(n), device=device) if weights is None else weights.float().sum()
    return total, count
