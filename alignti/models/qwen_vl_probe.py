"""Probing a batch whose samples have different vision-token counts (Qwen-VL's dynamic resolution).

The attention probe (`alignti.models.probe`) accepts the Qwen-VL language models unchanged:
their decoder attentions carry `layer_idx`, hold the composite config's `text_config` object
itself (the identity `_attention_modules` checks), call the attention function registered
under `config._attn_implementation` with `scaling` and the SDPA-built mask, and
`set_attn_implementation({"text_config": ...})` leaves the vision tower on SDPA. What it does
not accept is a batch whose samples request different numbers of key (vision) positions, which
Qwen-VL batches are as soon as two images differ in size. Until the probe keeps a key-validity
mask itself, these two functions bridge it: pad every sample's keys to the longest by repeating
its last key (a real column, so the probe computes an exact copy of that column's value), then
zero the copies.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from alignti.models.probe import l1_normalize


def pad_keys(keys: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Per-sample key positions of different lengths n_b -> same-length lists and validity.

    keys[b]: long [n_b] (n_b >= 1). Returns (keys padded to K = max n_b by repeating the last
    key, bool [B, K] with True for the n_b real ones).
    """
    width = max(int(k.numel()) for k in keys)
    padded, valid = [], torch.zeros(len(keys), width, dtype=torch.bool)
    for b, k in enumerate(keys):
        k = torch.as_tensor(k, dtype=torch.long).reshape(-1)
        if k.numel() == 0:
            raise ValueError(f"sample {b} has no key positions")
        padded.append(torch.cat([k, k[-1:].expand(width - k.numel())]))
        valid[b, : k.numel()] = True
    return padded, valid


def drop_padded_keys(alpha: torch.Tensor, valid: torch.Tensor, normalize: bool = False) -> torch.Tensor:
    """Raw probe result [B, K] -> the same with padded keys zeroed (L1-normalised over the real
    keys when `normalize`): alpha_l(x) of docs/method.md over each sample's own n_b vision tokens."""
    out = alpha * valid.to(alpha.device, alpha.dtype)
    return l1_normalize(out) if normalize else out
