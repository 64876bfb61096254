"""The per-batch loss terms of a distillation step: one student forward, LM head on the needed rows.

`loss_terms` runs the student's decoder once (`model.model`: hidden states, no logits), applies
the LM head only to the rows a weighted term needs (response rows for L_sft and L_kd, salient
vision rows for L_iva, ribbon candidate rows for L_tpa) and returns each term as (sum, count).
The attention probe runs in the same forward, at the layers the attention-valued terms need
(IVA with iva_target=attention, grounding). The trainer adds them over micro-batches and ranks and divides once by global counts
(`losses.combine`). Terms with weight 0 are not computed and not returned.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from transformers import PreTrainedModel

from alignti.distill.batches import DistillBatch
from alignti.distill.kl import padded_teacher_mass
from alignti.distill.losses import LossConfig, SumCount, iva_attention_loss, iva_loss, kd_loss, sft_rows_loss, tpa_loss
from alignti.errors import AlignTIError
from alignti.models.probe import probe_attention


def student_iva_layer(teacher_layer: int, teacher_layers: int, student_layers: int) -> int:
    """The student layer at the same relative depth as the teacher's IVA layer.

    Layers are placed on [0, 1] by l / (L - 1), so the first and last layers map to each other:
    round(l_T * (L_S - 1) / (L_T - 1)). A one-layer teacher maps to layer 0.
    """
    if teacher_layers <= 1:
        return 0
    return int(round(teacher_layer * (student_layers - 1) / (teacher_layers - 1)))


def resolve_iva_layer(model: PreTrainedModel, batch: DistillBatch, iva_layer: int | None) -> int:
    """The student layer probed by iva_target=attention: explicit, else the cached teacher layer scaled."""
    if iva_layer is None:
        if batch.teacher_iva_layer is None or batch.teacher_num_layers is None:
            raise AlignTIError("iva_target=attention needs a student --iva-layer: the cache records no IVA layer")
        layers = model.config.get_text_config().num_hidden_layers
        iva_layer = student_iva_layer(batch.teacher_iva_layer, batch.teacher_num_layers, layers)
    return _check_layer(model, iva_layer, "IVA layer")


def _zero(hidden: torch.Tensor) -> SumCount:
    """(0, 0) attached to the graph: a weighted term with nothing to score this micro-batch."""
    return hidden[..., :0].sum().float(), torch.zeros((), dtype=torch.float32, device=hidden.device)


def _check_layer(model: PreTrainedModel, layer: int, what: str) -> int:
    layers = model.config.get_text_config().num_hidden_layers
    if not 0 <= layer < layers:
        raise AlignTIError(f"{what} {layer} is outside the student's LM layers 0..{layers - 1}")
    return layer


def _forward(model: PreTrainedModel, batch: DistillBatch,
             probe_layers: list[int]) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """Hidden states [B, W, H] of the student's decoder and its attention {layer: [B, n_v]} at probe_layers."""
    if batch.max_input_id >= model.get_input_embeddings().num_embeddings:
        raise AlignTIError(f"token id {batch.max_input_id} is outside the student's vocabulary "
                           f"({model.get_input_embeddings().num_embeddings}); pass vocab_size to build_distill_batch")
    inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask,
              "pixel_values": batch.pixel_values, "use_cache": False}
    if batch.position_ids is not None:
        inputs["position_ids"] = batch.position_ids
    ctx = nullcontext(None) if not probe_layers else probe_attention(
        model, probe_layers, list(batch.attn_queries), list(batch.attn_keys), keep_graph=True)
    with ctx as probe:
        hidden = model.model(**inputs)[0]
    return hidden, {} if probe is None else probe.result(normalize=False)


def loss_terms(model: PreTrainedModel, batch: DistillBatch, loss_cfg: LossConfig,
               iva_layer: int | None = None) -> dict[str, SumCount]:
    """{"sft" | "kd" | "iva" | "tpa" | "ground": (sum, count)} for the terms with weight > 0.

    model: a LLaVA-style `*ForConditionalGeneration` (uses `model.model` and
    `model.get_output_embeddings()`). iva_layer: student layer for iva_target=attention
    (default: the cache's teacher layer at the same relative depth, `student_iva_layer`).
    Sums are fp32 scalars attached to the graph; counts equal `batch.counts()`.
    """
    w = loss_cfg.weights()
    div = loss_cfg.divergence_kwargs()
    attention = w["iva"] > 0 and loss_cfg.iva_target == "attention"
    probe_layers = []
    if attention and batch.attn_sample.numel():
        iva_layer = resolve_iva_layer(model, batch, iva_layer)
        probe_layers.append(iva_layer)
    if w["ground"] > 0 and batch.ground_sample.numel():
        probe_layers.append(_check_layer(model, loss_cfg.ground_layer, "--ground-layer"))
    hidden, probed = _forward(model, batch, sorted(set(probe_layers)))
    flat = hidden.reshape(-1, hidden.shape[-1])  # [B * W, H]
    head = model.get_output_embeddings()
    terms: dict[str, SumCount] = {}
    if w["sft"] > 0 or w["kd"] > 0:
        resp = head(flat.index_select(0, batch.resp_rows))  # [N, V]
        if w["sft"] > 0:
            terms["sft"] = sft_rows_loss(resp, batch.resp_targets, loss_cfg.chunk_size)
        if w["kd"] > 0:
            terms["kd"] = kd_loss(resp, batch.kd_ids, batch.kd_logprobs, **div)
    if attention:
        terms["iva"] = _zero(hidden) if iva_layer not in probed else iva_attention_loss(
            batch.attn_saliency, probed[iva_layer].index_select(0, batch.attn_sample))
    elif w["iva"] > 0:
        rows = head(flat.index_select(0, batch.iva_rows))  # [M, V]
        terms["iva"] = iva_loss(rows, batch.iva_ids, batch.iva_logprobs, batch.iva_weights, batch.iva_sample,
                                batch.num_samples, **div)
    if w["tpa"] > 0:
        rows = head(flat.index_select(0, batch.tpa_rows))  # [N_c * d, V]
        terms["tpa"] = tpa_loss(rows, batch.tpa_ids, batch.tpa_logprobs, batch.tpa_cand_logprobs,
                                weighting=loss_cfg.tpa_weighting, **div)
    if w["ground"] > 0:
        terms["ground"] = _zero(hidden) if loss_cfg.ground_layer not in probed else iva_attention_loss(
            batch.ground_target, probed[loss_cfg.ground_layer].index_select(0, batch.ground_sample))
    return terms


def padded_mass_warning(batch: DistillBatch, vocab_size: int) -> float:
    """Largest teacher probability on ids >= the student's vocab in any teacher row of the batch.

    That mass is moved to the tail bucket; the trainer warns once when it exceeds
    `kl.PADDED_MASS_WARN` (1e-6).
    """
    worst = 0.0
    for ids, lps in ((batch.kd_ids, batch.kd_logprobs), (batch.iva_ids, batch.iva_logprobs),
                     (batch.tpa_ids, batch.tpa_logprobs)):
        if ids.shape[0]:
            worst = max(worst, float(padded_teacher_mass(ids, lps, vocab_size).max()))
    return worst
