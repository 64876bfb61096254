"""Qwen-VL's 3-D rotary positions (M-RoPE) for plain batches and for the ribbon.

A Qwen-VL decoder takes `position_ids` [3, B, T]: one (temporal, height, width) triple per
token. Text tokens carry the same value on all three axes; an image's tokens carry their grid
coordinates offset by the image's start, and the text after an image continues from
start + max(h, w) / merge, not from start + n_v (modeling_qwen2_vl.py:895-997). So a token's
triple depends on everything before it, and the ribbon cannot number its slots itself.

The ribbon (`alignti.models.ribbon`) already maps every slot to the original position it
stands for: its 1-D `position_ids` are t for the ground-truth token t and t+1 for a candidate of
step t (the ground-truth token it replaces), and so are a `CandidatePass`'s. The M-RoPE
positions of either are therefore the plain batch's triples gathered at those indices
(`gather_positions`); no second ribbon builder is needed.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel



def image_token_ids(input_ids: torch.Tensor, image_token_id: int) -> torch.Tensor:
    """`mm_token_type_ids` for image-only inputs: 1 at image tokens, 0 elsewhere (the processor's
    create_mm_token_type_ids, processing_utils.py:996-1026). int [B, T], like input_ids."""
    return (input_ids == image_token_id).int()


def rope_positions(model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                   image_grid_thw: torch.Tensor | None) -> torch.Tensor:
    """long [3, B, T]: the positions the model computes itself for this padded batch.

    input_ids / attention_mask: [B, T] (2-D 0/1 mask, either padding side; padded slots get 0);
    image_grid_thw: [n_images, 3] in batch order, or None for text only. The three families'
    `get_rope_index` share these keyword names in transformers 5.24 (qwen2_vl:895, qwen2_5_vl:934
    (which adds `second_per_grid_ts`, for videos, before `attention_mask`), qwen3_vl:919); keywords
    keep the call the same for all three.
    """
    image_token_id = model.config.image_token_id
    positions, _ = model.model.get_rope_index(
        input_ids, mm_token_type_ids=image_token_ids(input_ids, image_token_id),
        image_grid_thw=image_grid_thw, attention_mask=attention_mask)
    return positions


def gather_positions(positions: torch.Tensor, index: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """M-RoPE positions of a ribbon or candidate pass: long [3, B, W].

    positions: [3, B, T] of the *right-padded* ground-truth batch (`rope_positions`), so column t
    is sample position t; index: long [B, W], `ribbon.position_ids` or `candidate_pass.position_ids`
    (the original position each slot stands for; 0 for padding slots, which see only themselves);
    lengths: long [B] ground-truth lengths T_b. Each candidate gets its stand-in's triple and
    each ground-truth token keeps its own.
    """
    if positions.ndim != 3 or positions.shape[0] != 3 or index.ndim != 2 or index.shape[0] != positions.shape[1]:
        raise ValueError(f"positions [3, B, T] and index [B, W] expected, got {tuple(positions.shape)} "
                         f"and {tuple(index.shape)}")
    index = index.to(positions.device)
    beyond = index >= lengths.to(index.device)[:, None]
    if bool(beyond.any()):
        # a candidate of a sample's last position would stand in for a token that does not exist
        raise ValueError("a slot stands for a position past its sample's last ground-truth token")
    return positions.gather(2, index[None].expand(3, -1, -1))
