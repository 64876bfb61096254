"""Teacher signals from hidden states: chunked top-k log-probs and TPA candidate proposals.

The LM head is applied to a few hundred rows at a time, so the `[T, V]` log-softmax of a
152k-token vocabulary is never materialised for a whole batch; only `[chunk, V]` exists at
once, on the teacher's device.
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn


def topk_logprobs(hidden: torch.Tensor, lm_head: nn.Module, k: int, chunk_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k next-token log-probs of each row.

    hidden: [N, H] final hidden states (any dtype) -> (ids int64 [N, k], logprobs fp32 [N, k]),
    sorted by descending log-prob; log-probs are log-softmax of fp32 logits (temperature 1).
    """
    n = hidden.shape[0]
    ids = torch.empty((n, k), dtype=torch.long, device=hidden.device)
    lps = torch.empty((n, k), dtype=torch.float32, device=hidden.device)
    for s in range(0, n, chunk_size):
        logits = lm_head(hidden[s:s + chunk_size]).float()  # [c, V]
        lse = torch.logsumexp(logits, dim=-1, keepdim=True)
        vals, idx = logits.topk(min(k, logits.shape[-1]), dim=-1)
        ids[s:s + chunk_size] = idx
        lps[s:s + chunk_size] = vals - lse
    return ids, lps


def sample_seed(seed: int, sample_id: str) -> int:
    """Per-sample RNG seed: proposals do not depend on batching, worker count or resume."""
    digest = hashlib.sha256(f"{seed}:{sample_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def propose_top(topk_ids: torch.Tensor, targets: torch.Tensor, d: int, exclude: int | None = None) -> torch.Tensor:
    """The teacher's d most likely tokens other than the ground truth (and `exclude`, the image
    token: a candidate image token would break the vision-token run).

    topk_ids: [N, k] (k >= d + 2), targets: [N] ground-truth next tokens -> [N, d].
    """
    keep = topk_ids != targets[:, None]  # [N, k]; at most one False per row
    if exclude is not None:
        keep &= topk_ids != exclude
    # Stable order: rank among kept entries; the first d kept entries are the proposals.
    rank = torch.cumsum(keep.long(), dim=-1)
    chosen = keep & (rank <= d)
    return topk_ids[chosen].view(-1, d)


def propose_sample(hidden: torch.Tensor, lm_head: nn.Module, targets: torch.Tensor, d: int, seed: int,
                   exclude: int | None = None) -> torch.Tensor:
    """d draws without replacement from p_T excluding the ground truth and `exclude` (Gumbel top-d), seeded.

    hidden: [N, H] rows of ONE sample, targets: [N] -> [N, d] candidate ids. The Gumbel noise is
    drawn on the CPU from a generator seeded per sample, so results are device-independent.
    """
    gen = torch.Generator().manual_seed(seed)
    out = torch.empty((hidden.shape[0], d), dtype=torch.long, device=hidden.device)
    for i in range(hidden.shape[0]):
        logits = lm_head(hidden[i:i + 1]).float()[0]  # [V]
        logp = torch.log_softmax(logits, dim=-1)
        u = torch.rand(logp.shape[0], generator=gen, dtype=torch.float64).clamp_(1e-12, 1 - 1e-12)
        gumbel = (-torch.log(-torch.log(u))).to(device=logp.device, dtype=torch.float32)
        scores = logp + gumbel
        scores[targets[i]] = float("-inf")
        if exclude is not None:
            scores[exclude] = float("-inf")
        out[i] = scores.topk(d).indices
    return out


def gather_logprobs(hidden: torch.Tensor, lm_head: nn.Module, ids: torch.Tensor, chunk_size: int = 256) -> torch.Tensor:
    """log p(ids | row) for each row. hidden: [N, H], ids: [N, d] -> fp32 [N, d]."""
    out = torch.empty(ids.shape, dtype=torch.float32, device=hidden.device)
    for s in range(0, hidden.shape[0], chunk_size):
        logits = lm_head(hidden[s:s + chunk_size]).float()
        out[s:s + chunk_size] = torch.gather(logits, 1, ids[s:s + chunk_size]) - torch.logsumexp(logits, -1, keepdim=True)
    return out


def choose_tpa_steps(target_logprobs: torch.Tensor, max_positions: int | None) -> torch.Tensor:
    """Which response rows get candidates: all, or the `max_positions` rows with the most
    off-path teacher mass (1 - p_T(y_t)), where the transition term carries most signal.

    target_logprobs: [N_r] teacher log p(y_t) -> int64 ascending row indices.
    """
    n = target_logprobs.shape[0]
    if max_positions is None or max_positions >= n:
        return torch.arange(n, device=target_logprobs.device)
    off_path = 1 - target_logprobs.exp()
    return off_path.topk(max_positions).indices.sort().values
