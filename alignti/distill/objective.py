"""The distillation objective as one module: one student forward, the LM head on the needed rows.

`Objective` is what the trainer prepares with accelerate (DDP wraps it). `forward(batch)` runs the
student's decoder once (`model.model`: hidden states, no logits) under the run's autocast, applies
the LM head only to the rows a weighted term needs (response rows for L_sft and L_kd, salient
vision rows for L_iva, ribbon candidate rows for L_tpa), fused into each term's chunked loss, and
returns each term as (sum, count). With `--tpa-weighting student` the candidates' weights come from
the student's own logits at the ground-truth rows they stand in for (`candidate_scores`). The
attention probe runs in the same forward, at the layers the attention-valued terms need (IVA with
iva_target=attention, grounding); those student layers are resolved and checked once, at set-up
(`probe_layers`). The trainer adds the terms over micro-batches and processes and divides once by
the global counts (`losses.combine`). Terms with weight 0 are not computed and not returned.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from transformers import PreTrainedModel

from alignti.distill.batches import DistillBatch
from alignti.distill.config import LossConfig
from alignti.distill.kl import padded_teacher_mass
from alignti.distill.losses import (
    SumCount, iva_attention_loss, iva_loss, kd_loss, sft_kd_loss, sft_rows_loss, tpa_loss,
)
from alignti.errors import AlignTIError
from alignti.models.family import decoder_hidden, family_of
from alignti.models.probe import probe_attention


def student_iva_layer(teacher_layer: int, teacher_layers: int, student_layers: int) -> int:
    """The student layer at the same relative depth as the teacher's IVA layer.

    Layers are placed on [0, 1] by l / (L - 1), so the first and last layers map to each other:
    round(l_T * (L_S - 1) / (L_T - 1)). A one-layer teacher maps to layer 0.
    """
    if teacher_layers <= 1:
        return 0
    return int(round(teacher_layer * (student_layers - 1) / (teacher_layers - 1)))


def probe_layers(loss_cfg: LossConfig, student_layers: int, cache_layer: int | None,
                 cache_depth: int | None) -> tuple[int | None, int | None]:
    """(IVA layer, grounding layer) the student's probe needs, None where no term needs one.

    The IVA layer (iva_target=attention) is --iva-student-layer, else the cache's teacher layer
    (`cache_layer` of a `cache_depth`-layer teacher) at the same relative depth. AlignTIError for a
    layer outside the student, or an attention target without any layer to take.
    """
    w = loss_cfg.weights()
    iva = None
    if w["iva"] > 0 and loss_cfg.iva_target == "attention":
        iva = loss_cfg.iva_student_layer
        if iva is None:
            if cache_layer is None or cache_depth is None:
                raise AlignTIError("--iva-target attention needs --iva-student-layer: the cache records no IVA layer")
            iva = student_iva_layer(cache_layer, cache_depth, student_layers)
    ground = loss_cfg.ground_layer if w["ground"] > 0 else None
    for layer, option in ((iva, "--iva-student-layer"), (ground, "--ground-layer")):
        if layer is not None and not 0 <= layer < student_layers:
            raise AlignTIError(f"{option} {layer} is outside the student's LM layers 0..{student_layers - 1}")
    return iva, ground


def candidate_scores(head: torch.nn.Linear, hidden: torch.Tensor, step_rows: torch.Tensor,
                     cand_ids: torch.Tensor) -> torch.Tensor:
    """The student's logits of each step's candidates at its ground-truth row: fp32 [N_c, d], detached.

    hidden: [M, H] flat hidden states; step_rows: [N_c] the row t of each step (whose next token is
    y_{t+1}); cand_ids: [N_c, d]. z[n, j] = h_t . W[a_j] (+ b[a_j]): only the d head rows of the
    candidates, no [N_c, V] logits. `tpa_weights` softmaxes them over the candidates, so the
    log-sum-exp of p_S(. | y_<=t) is not needed.
    """
    # fp32 even under the run's bf16 autocast (which would cast the einsum down)
    with torch.no_grad(), torch.autocast(hidden.device.type, enabled=False):
        h = hidden.index_select(0, step_rows).float()  # [N_c, H]
        w = head.weight.float()[cand_ids]  # [N_c, d, H]
        z = torch.einsum("nh,ndh->nd", h, w)
        return z if head.bias is None else z + head.bias.float()[cand_ids]


def _zero(hidden: torch.Tensor) -> SumCount:
    """(0, 0) attached to the graph: a weighted term with nothing to score this micro-batch."""
    return hidden[..., :0].sum().float(), torch.zeros((), dtype=torch.float32, device=hidden.device)


class Objective(torch.nn.Module):
    """The student plus the weighted loss terms: forward(batch) -> {term: (sum, count)}.

    model: a `*ForConditionalGeneration` of any family (`alignti.models.family`: its decoder, LM
    head and position ids). iva_layer / ground_layer: from `probe_layers`. autocast:
    bf16 autocast over fp32 master weights, or None for fp32; the loss terms upcast their rows to
    fp32 either way. Mixed precision is ours, not accelerate's: its process-wide state would refuse
    a second run with another --dtype in the same process.
    """

    def __init__(self, model: PreTrainedModel, loss_cfg: LossConfig, iva_layer: int | None = None,
                 ground_layer: int | None = None, autocast: torch.dtype | None = None) -> None:
        super().__init__()
        self.model, self.loss_cfg, self.autocast = model, loss_cfg, autocast
        self.iva_layer, self.ground_layer = iva_layer, ground_layer
        self.weights, self.div = loss_cfg.weights(), loss_cfg.divergence_kwargs()
        self.family = family_of(model.config)
        assert (iva_layer is not None) == (self.weights["iva"] > 0 and loss_cfg.iva_target == "attention"), iva_layer
        assert (ground_layer is not None) == (self.weights["ground"] > 0), ground_layer

    def forward(self, batch: DistillBatch) -> dict[str, SumCount]:
        """Sums are fp32 scalars attached to the graph; counts equal `batch.counts()`."""
        device = batch.input_ids.device.type
        with torch.autocast(device, dtype=self.autocast or torch.bfloat16, enabled=self.autocast is not None):
            return self._terms(batch)

    def _hidden(self, batch: DistillBatch, layers: list[int]) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Hidden states [B, W, H] of the student's decoder and its attention {layer: [B, K]} at `layers`.

        Positions: the family's for the plain batch, and for a ribbon each slot's stand-in's."""
        assert batch.max_input_id < self.model.get_input_embeddings().num_embeddings, "build the batch with vocab_size"
        positions = None
        if batch.position_ids is not None:
            plain = self.family.plain_positions(self.model, batch.plain_input_ids, batch.plain_attention_mask,
                                                batch.images)
            positions = self.family.ribbon_positions(plain, batch.position_ids, batch.lengths)
        ctx = nullcontext(None) if not layers else probe_attention(
            self.model, layers, list(batch.attn_queries), list(batch.attn_keys), keep_graph=True)
        with ctx as probe:
            hidden = decoder_hidden(self.model, batch.input_ids, batch.attention_mask, batch.images, positions,
                                    use_cache=False)
        return hidden, {} if probe is None else probe.result(normalize=False)

    def _terms(self, batch: DistillBatch) -> dict[str, SumCount]:
        w, div = self.weights, self.div
        attention = self.iva_layer is not None
        layers = [layer for layer, samples in ((self.iva_layer, batch.attn_sample),
                                               (self.ground_layer, batch.ground_sample))
                  if layer is not None and samples.numel()]
        hidden, probed = self._hidden(batch, sorted(set(layers)))
        # [B * W, H]; every term gathers its rows and applies the LM head chunk by chunk inside its
        # recomputed loss chunk (kl.chunked_row_sum), so no [N, V] logits exist whatever N is.
        flat = hidden.reshape(-1, hidden.shape[-1])
        fused = {"head": self.family.lm_head(self.model), **div}
        terms: dict[str, SumCount] = {}
        if w["sft"] > 0 and w["kd"] > 0:  # one head pass over the response rows for both
            terms["sft"], terms["kd"] = sft_kd_loss(flat, batch.resp_targets, batch.kd_ids, batch.kd_logprobs,
                                                    row_index=batch.resp_rows, **fused)
        elif w["sft"] > 0:
            terms["sft"] = sft_rows_loss(flat, batch.resp_targets, div["chunk_size"], row_index=batch.resp_rows,
                                         head=fused["head"])
        elif w["kd"] > 0:
            terms["kd"] = kd_loss(flat, batch.kd_ids, batch.kd_logprobs, row_index=batch.resp_rows, **fused)
        if attention:
            terms["iva"] = _zero(hidden) if self.iva_layer not in probed else iva_attention_loss(
                batch.attn_saliency, probed[self.iva_layer].index_select(0, batch.attn_sample))
        elif w["iva"] > 0:
            terms["iva"] = iva_loss(flat, batch.iva_ids, batch.iva_logprobs, batch.iva_weights, batch.iva_sample,
                                    batch.num_samples, row_index=batch.iva_rows, **fused)
        if w["tpa"] > 0:
            scores = None
            if self.loss_cfg.tpa_weighting == "student":  # the candidates are the ribbon's inputs at their rows
                cand_ids = batch.input_ids.reshape(-1)[batch.tpa_rows].reshape(batch.tpa_cand_logprobs.shape)
                scores = candidate_scores(fused["head"], flat, batch.tpa_step_rows, cand_ids)
            terms["tpa"] = tpa_loss(flat, batch.tpa_ids, batch.tpa_logprobs, batch.tpa_cand_logprobs,
                                    weighting=self.loss_cfg.tpa_weighting, student_scores=scores,
                                    row_index=batch.tpa_rows, **fused)
        if self.ground_layer is not None:
            terms["ground"] = _zero(hidden) if self.ground_layer not in probed else iva_attention_loss(
                batch.ground_target, probed[self.ground_layer].index_select(0, batch.ground_sample))
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
