"""The ribbon layout: ground-truth rows and TPA candidate rows from one forward pass.

docs/method.md (TPA, ribbon). For each chosen response step t of a sample (position t, whose next token
y_{t+1} is a ground-truth response token), the d candidate tokens a_{t,1..d} are inserted
immediately before token t+1. Candidate a_{t,j} gets position id t+1 (that of y_{t+1}) and
attends to the ground-truth prefix 0..t and to itself only; no other token attends to any
candidate. So the logits at ground-truth tokens equal the plain pass, and the logits at
a_{t,j} are p(.|y_<=t, a_{t,j}). A 4-D additive float mask (0 / dtype min; a boolean 4-D mask is
silently wrong under eager) and explicit position ids express this under eager and SDPA.

Extraction (teacher) and distillation (student) both call `build_ribbon`, so their rows line
up by construction. Samples are batched by right padding; padded rows attend to themselves only,
so no row is fully masked (no NaN). The image-token run is never split (candidates go after
it) and pixel_values pass through unchanged.

Teacher-side shortcut: a plain forward over the right-padded ground truth
with a cache, then `build_candidate_pass` over the candidates alone gives the same rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


_NOT_GT = torch.iinfo(torch.long).max  # column "position" of non-ground-truth slots: never visible


@dataclass(frozen=True)
class Ribbon:
    """A batch of ribbons plus the maps back to ground-truth and candidate rows.

    B samples, ground-truth lengths T_b (T = max), N = total chosen steps over the batch (in
    sample order), d candidates per step, T_r = max ribbon length = max_b (T_b + n_b * d).
    """

    input_ids: torch.Tensor  # LongTensor [B, T_r], right-padded with pad_id
    position_ids: torch.Tensor  # LongTensor [B, T_r]; candidate of step t -> t+1, padding -> 0
    attention_mask: torch.Tensor  # float [B, 1, T_r, T_r], 0 = attend, dtype min = masked
    gt_index: torch.Tensor  # LongTensor [B, T]: ribbon index of original position t (0 where invalid)
    gt_valid: torch.Tensor  # bool [B, T]: t < T_b
    cand_batch: torch.Tensor  # LongTensor [N]: sample of each step
    cand_step: torch.Tensor  # LongTensor [N]: the step t (original position) of each step
    cand_index: torch.Tensor  # LongTensor [N, d]: ribbon index of candidate j of each step
    lengths: torch.Tensor  # LongTensor [B]: T_b
    ribbon_lengths: torch.Tensor  # LongTensor [B]: T_b + n_b * d

    def model_inputs(self) -> dict[str, torch.Tensor]:
        """Keyword arguments for `model(**ribbon.model_inputs(), pixel_values=..., use_cache=False)`."""
        return {"input_ids": self.input_ids, "position_ids": self.position_ids, "attention_mask": self.attention_mask}


@dataclass(frozen=True)
class CandidatePass:
    """Inputs of the cached candidate pass (teacher-side shortcut) and its candidate map.

    W = cache length (width of the right-padded ground-truth batch), M = max_b n_b * d.
    """

    input_ids: torch.Tensor  # LongTensor [B, M]
    position_ids: torch.Tensor  # LongTensor [B, M]
    attention_mask: torch.Tensor  # float [B, 1, M, W + M]
    cand_batch: torch.Tensor  # LongTensor [N]
    cand_step: torch.Tensor  # LongTensor [N]
    cand_index: torch.Tensor  # LongTensor [N, d]: row of candidate j of each step in [0, M)

    def model_inputs(self) -> dict[str, torch.Tensor]:
        """Keyword arguments for `model(**cp.model_inputs(), cache=cache_of_the_plain_pass)`."""
        return {"input_ids": self.input_ids, "position_ids": self.position_ids, "attention_mask": self.attention_mask}


def _check_sample(b: int, ids: torch.Tensor, steps: torch.Tensor, cands: torch.Tensor,
                  image_token_id: int | None) -> None:
    """Boundary checks for one sample (cheap: CPU tensors of a few hundred entries)."""
    if ids.ndim != 1 or ids.numel() == 0:
        raise ValueError(f"ribbon sample {b}: input ids must be a non-empty 1-D tensor")
    if steps.ndim != 1 or cands.ndim != 2 or cands.shape[0] != steps.numel():
        raise ValueError(f"ribbon sample {b}: steps [n] and candidates [n, d] disagree "
                           f"({tuple(steps.shape)} vs {tuple(cands.shape)})")
    if steps.numel() == 0:
        return
    if int(steps[0]) < 0 or int(steps[-1]) >= ids.numel() or bool((steps[1:] <= steps[:-1]).any()):
        raise ValueError(f"ribbon sample {b}: steps must be strictly increasing in [0, {ids.numel() - 1}]")
    if image_token_id is not None:
        image_pos = (ids == image_token_id).nonzero()
        if image_pos.numel() and int(steps[0]) < int(image_pos.max()):
            raise ValueError(f"ribbon sample {b}: a step before the last image token would split the image run")
        if bool((cands == image_token_id).any()):
            raise ValueError(f"ribbon sample {b}: a candidate is the image token")


def _normalise(input_ids: Sequence[torch.Tensor], steps: Sequence[torch.Tensor],
               candidates: Sequence[torch.Tensor], image_token_id: int | None) -> tuple[list, list, list, int]:
    """CPU long tensors per sample, zero-step samples reshaped to [0, d]; returns d too."""
    if not (len(input_ids) == len(steps) == len(candidates)) or len(input_ids) == 0:
        raise ValueError("ribbon: input_ids, steps and candidates need one entry per sample (B >= 1)")
    ids = [torch.as_tensor(x).long().cpu() for x in input_ids]
    stp = [torch.as_tensor(s).long().cpu().reshape(-1) for s in steps]
    cnd = [torch.as_tensor(c).long().cpu() for c in candidates]
    widths = {c.shape[1] if c.ndim == 2 else -1 for c in cnd if c.shape[0] > 0}
    if len(widths) > 1 or min(widths, default=1) < 1:
        raise ValueError(f"ribbon: candidates must be [n, d] with one d >= 1 for all steps, got {sorted(widths)}")
    d = widths.pop() if widths else 0
    cnd = [c.reshape(0, d) if c.shape[0] == 0 else c for c in cnd]
    for b in range(len(ids)):
        _check_sample(b, ids[b], stp[b], cnd[b], image_token_id)
    return ids, stp, cnd, d


def _additive_mask(row_limit: torch.Tensor, col_pos: torch.Tensor, self_col: torch.Tensor,
                   dtype: torch.dtype, device: torch.device | str | None) -> torch.Tensor:
    """float [B, 1, R, C]: row r sees column c iff col_pos[c] <= row_limit[r], and always c == self_col[r].

    row_limit [B, R] (-1 for padding rows), col_pos [B, C] (_NOT_GT for non-ground-truth
    columns), self_col [B, R]. Every row sees at least itself, so softmax never meets an empty row.
    """
    row_limit, col_pos, self_col = (t.to(device) for t in (row_limit, col_pos, self_col))
    visible = col_pos[:, None, :] <= row_limit[:, :, None]
    cols = torch.arange(col_pos.shape[1], device=visible.device)
    visible |= cols[None, None, :] == self_col[:, :, None]
    mask = torch.zeros(visible.shape, dtype=dtype, device=visible.device)
    return mask.masked_fill_(~visible, torch.finfo(dtype).min)[:, None]


def _candidate_map(stp: list[torch.Tensor], d: int, first: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """Flattened (sample, step, index [N, d]) from per-sample first-candidate indices [n_b]."""
    batch = torch.cat([torch.full((s.numel(),), b, dtype=torch.long) for b, s in enumerate(stp)])
    step = torch.cat(stp)
    index = torch.cat(first)[:, None] + torch.arange(d)[None, :]
    return batch, step, index


def build_ribbon(
    input_ids: Sequence[torch.Tensor],
    steps: Sequence[torch.Tensor],
    candidates: Sequence[torch.Tensor],
    pad_id: int,
    dtype: torch.dtype = torch.float32,
    image_token_id: int | None = None,
    device: torch.device | str | None = None,
) -> Ribbon:
    """Build the ribbon batch.

    input_ids[b]: LongTensor [T_b], one unpadded ground-truth sequence (image run included).
    steps[b]: LongTensor [n_b], strictly increasing positions t (0 <= t < T_b) whose next token
    y_{t+1} gets alternatives; n_b may be 0. candidates[b]: LongTensor [n_b, d] (same d for all
    steps; a [0] or [0, d] tensor for a sample with no steps). dtype: the model's dtype (mask
    values). image_token_id: when given, refuses steps before the last image token and image-token
    candidates. device: where the output tensors go (default CPU).
    """
    ids, stp, cnd, d = _normalise(input_ids, steps, candidates, image_token_id)
    bsz = len(ids)
    lengths = torch.tensor([x.numel() for x in ids])
    ribbon_lengths = lengths + torch.tensor([s.numel() * d for s in stp])
    width, t_max = int(ribbon_lengths.max()), int(lengths.max())
    out_ids = torch.full((bsz, width), pad_id, dtype=torch.long)
    pos = torch.zeros(bsz, width, dtype=torch.long)
    row_limit = torch.full((bsz, width), -1, dtype=torch.long)  # padding rows see nothing but themselves
    col_pos = torch.full((bsz, width), _NOT_GT, dtype=torch.long)
    gt_index = torch.zeros(bsz, t_max, dtype=torch.long)
    first = []
    for b in range(bsz):
        orig = torch.arange(lengths[b])
        # original position p moves right by d for every step t < p (candidates inserted before t+1)
        g = orig + d * torch.searchsorted(stp[b], orig, side="left")
        c0 = stp[b] + 1 + d * torch.arange(stp[b].numel())  # first candidate of each step
        c = (c0[:, None] + torch.arange(d)[None, :]).reshape(-1)
        gt_index[b, : lengths[b]] = g
        out_ids[b, g], out_ids[b, c] = ids[b], cnd[b].reshape(-1)
        pos[b, g], pos[b, c] = orig, (stp[b] + 1).repeat_interleave(d)
        row_limit[b, g], row_limit[b, c] = orig, stp[b].repeat_interleave(d)
        col_pos[b, g] = orig
        first.append(c0)
    cand_batch, cand_step, cand_index = _candidate_map(stp, d, first)
    self_col = torch.arange(width).expand(bsz, width)
    mask = _additive_mask(row_limit, col_pos, self_col, dtype, device)
    gt_valid = torch.arange(t_max)[None, :] < lengths[:, None]
    tensors = (out_ids, pos, gt_index, gt_valid, cand_batch, cand_step, cand_index, lengths, ribbon_lengths)
    out_ids, pos, gt_index, gt_valid, cand_batch, cand_step, cand_index, lengths, ribbon_lengths = (
        t.to(device) for t in tensors)
    return Ribbon(out_ids, pos, mask, gt_index, gt_valid, cand_batch, cand_step, cand_index, lengths, ribbon_lengths)


def gather_ground_truth(ribbon: Ribbon, rows: torch.Tensor) -> torch.Tensor:
    """[B, T_r, ...] ribbon rows (logits or hidden states) -> [B, T, ...] at original positions.

    Entries with `ribbon.gt_valid` False are filler (row 0 of that sample); mask them.
    """
    b = torch.arange(rows.shape[0], device=rows.device)[:, None]
    return rows[b, ribbon.gt_index.to(rows.device)]


def gather_candidates(ribbon: Ribbon | CandidatePass, rows: torch.Tensor) -> torch.Tensor:
    """[B, T_r, ...] (or [B, M, ...] of a candidate pass) -> [N, d, ...]: row of candidate j of step n."""
    return rows[ribbon.cand_batch.to(rows.device)[:, None], ribbon.cand_index.to(rows.device)]


def build_candidate_pass(
    input_ids: Sequence[torch.Tensor],
    steps: Sequence[torch.Tensor],
    candidates: Sequence[torch.Tensor],
    cache_length: int,
    pad_id: int,
    dtype: torch.dtype = torch.float32,
    image_token_id: int | None = None,
    device: torch.device | str | None = None,
) -> CandidatePass:
    """Teacher-side shortcut: the candidates alone, run on top of the plain pass's cache.

    First run the plain forward over the ground truth right-padded to width `cache_length`
    (with its 2-D attention mask and a DynamicCache; its logits are the ground-truth rows). Then
    `model(**cp.model_inputs(), cache=that_cache)`: candidate a_{t,j} sees cache columns 0..t
    and itself; its logits equal the ribbon's. Arguments as in `build_ribbon`.
    """
    ids, stp, cnd, d = _normalise(input_ids, steps, candidates, image_token_id)
    bsz, counts = len(ids), [s.numel() * d for s in stp]
    if cache_length < max(x.numel() for x in ids):
        raise ValueError(f"candidate pass: cache length {cache_length} is shorter than a sample")
    width = max(max(counts), 1)
    out_ids = torch.full((bsz, width), pad_id, dtype=torch.long)
    pos = torch.zeros(bsz, width, dtype=torch.long)
    row_limit = torch.full((bsz, width), -1, dtype=torch.long)
    col_pos = torch.full((bsz, cache_length + width), _NOT_GT, dtype=torch.long)
    first = []
    for b in range(bsz):
        out_ids[b, : counts[b]] = cnd[b].reshape(-1)
        pos[b, : counts[b]] = (stp[b] + 1).repeat_interleave(d)
        row_limit[b, : counts[b]] = stp[b].repeat_interleave(d)
        col_pos[b, : ids[b].numel()] = torch.arange(ids[b].numel())  # padded cache slots stay hidden
        first.append(d * torch.arange(stp[b].numel()))
    cand_batch, cand_step, cand_index = _candidate_map(stp, d, first)
    self_col = cache_length + torch.arange(width).expand(bsz, width)
    mask = _additive_mask(row_limit, col_pos, self_col, dtype, device)
    out_ids, pos, cand_batch, cand_step, cand_index = (
        t.to(device) for t in (out_ids, pos, cand_batch, cand_step, cand_index))
    return CandidatePass(out_ids, pos, mask, cand_batch, cand_step, cand_index)
