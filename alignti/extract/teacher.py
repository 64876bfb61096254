"""One batch through the teacher -> every sample's Align-TI signals (`SampleSignals`).

Two teacher passes per batch (docs/method.md):
1. the plain forward over the right-padded ground truth, with the attention probe at the IVA
   layer and a KV cache: response top-k rows, saliency, vision-position rows, TPA proposals;
2. the candidate pass on top of that cache (the ribbon's teacher-side shortcut): each
   candidate's top-k_t row.
The LM head is applied to the needed rows only, in chunks (`signals.py`). Positions and the
decoder / head come from the model's family adapter (`alignti.models.family`): the candidate
pass numbers each candidate as the ground-truth token it stands in for (1-D, or M-RoPE triples).
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from transformers import DynamicCache, PreTrainedModel

from alignti.data.batching import Batch
from alignti.data.encode import EncodedSample
from alignti.models.family import decoder_hidden, family_of
from alignti.models.probe import probe_attention, probe_targets
from alignti.models.ribbon import build_candidate_pass, gather_candidates
from alignti.extract.signals import (
    choose_tpa_steps, gather_logprobs, propose_sample, propose_top, sample_seed, topk_logprobs,
)
from alignti.extract.teacher_output import (
    IvaRows, ResponseRows, TeacherOutput, TpaProposals, TpaRows, attach_candidate_rows, to_sample_signals,
)
from alignti.storage.schema import CacheSettings, SampleSignals


def plain_pass(model: PreTrainedModel, batch: Batch, iva_layer: int | None, cache: DynamicCache | None = None,
               positions: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The teacher's forward over the (right-padded) ground truth, with the attention probe at
    `iva_layer`: (final hidden [B, T, H], saliency [B, max n_v] normalised per sample over its own
    n_v vision tokens (zeros after them), or None). positions: the family's `plain_positions` of
    the batch, computed here when None.

    Also the saliency source of the vLLM backend, where `model` is the teacher cut after
    `iva_layer` (its hidden states are then unused).
    """
    probe_ctx = nullcontext(None)
    if iva_layer is not None and any(s.n_v for s in batch.samples):
        queries, keys = probe_targets(batch.samples)
        probe_ctx = probe_attention(model, [iva_layer], queries, keys)
    with probe_ctx as probe:
        hidden = decoder_hidden(model, batch.input_ids, batch.attention_mask, batch.images, positions,
                                cache=cache, use_cache=cache is not None)
    return hidden, (probe.result(normalize=True)[iva_layer] if probe is not None else None)


def salient_positions(saliency: torch.Tensor, max_positions: int) -> torch.Tensor:
    """The P most salient vision positions, most salient first. saliency: [n_v] -> int64 [min(P, n_v)]."""
    return torch.topk(saliency, min(max_positions, saliency.shape[0])).indices


class HfTeacher:
    """The transformers teacher: a batch -> every sample's `SampleSignals`, for one set of settings."""

    def __init__(self, model: PreTrainedModel, settings: CacheSettings, pad_id: int, chunk_size: int = 256) -> None:
        self.model = model
        self.settings = settings
        self.pad_id = pad_id
        self.chunk_size = chunk_size
        self.family = family_of(model.config)
        self.lm_head = self.family.lm_head(model)
        self.image_token_id = model.config.image_token_id

    @torch.inference_mode()
    def __call__(self, batch: Batch) -> list[SampleSignals]:
        batch = batch.to(self.model.device, self.model.dtype)
        cache = DynamicCache(config=self.model.config.get_text_config())
        positions = self.family.plain_positions(self.model, batch.input_ids, batch.attention_mask, batch.images)
        hidden, saliency = plain_pass(self.model, batch, self.settings.iva_layer, cache, positions)
        response = [self._response(s, hidden[b]) for b, s in enumerate(batch.samples)]
        proposals = [self._proposals(s, hidden[b], r) for b, (s, r) in enumerate(zip(batch.samples, response))]
        tpa = self._candidate_rows(batch, response, proposals, cache, positions)
        iva = [self._iva(s, hidden[b], None if saliency is None else saliency[b]) for b, s in enumerate(batch.samples)]
        return [to_sample_signals(s, TeacherOutput(response=r, tpa=t, iva=v), self.settings)
                for s, r, t, v in zip(batch.samples, response, tpa, iva)]

    def _response(self, s: EncodedSample, hidden: torch.Tensor) -> ResponseRows:
        """Top-k rows at the response positions. hidden: [T, H]."""
        resp = s.resp_positions.to(hidden.device)
        return ResponseRows(resp, *topk_logprobs(hidden[resp], self.lm_head, self.settings.top_k, self.chunk_size))

    def _proposals(self, s: EncodedSample, hidden: torch.Tensor, response: ResponseRows) -> TpaProposals | None:
        """The TPA steps and their d candidates with teacher log-probs. hidden: [T, H]."""
        st, resp = self.settings, response.positions
        if st.tpa_d <= 0 or not resp.numel():
            return None
        targets = s.input_ids.to(hidden.device)[resp + 1]
        target_lp = gather_logprobs(hidden[resp], self.lm_head, targets[:, None], self.chunk_size)[:, 0]
        rows = choose_tpa_steps(target_lp, st.tpa_max_positions)
        if st.tpa_proposal == "top":
            cands = propose_top(response.topk_ids[rows], targets[rows], st.tpa_d, self.image_token_id)
        else:
            cands = propose_sample(hidden[resp[rows]], self.lm_head, targets[rows], st.tpa_d,
                                   sample_seed(st.seed, s.sample_id), self.image_token_id)
        return TpaProposals(rows, cands, gather_logprobs(hidden[resp[rows]], self.lm_head, cands, self.chunk_size))

    def _iva(self, s: EncodedSample, hidden: torch.Tensor, saliency: torch.Tensor | None) -> IvaRows | None:
        """Saliency and the top-k_v rows at the most salient vision positions. hidden: [T, H], saliency: [n_v]."""
        if saliency is None or not s.n_v:
            return None
        w = saliency[: s.n_v].float()
        pos = salient_positions(w, self.settings.iva_max_positions)
        return IvaRows(w, pos, *topk_logprobs(hidden[s.vision_start + pos], self.lm_head, self.settings.iva_top_k,
                                              self.chunk_size))

    def _candidate_rows(self, batch: Batch, response: list[ResponseRows], proposals: list[TpaProposals | None],
                        cache: DynamicCache, positions: torch.Tensor | None) -> list[TpaRows | None]:
        """Run every sample's candidates on top of the plain pass's cache: their top-k_t rows.
        positions: the plain pass's (`Family.plain_positions`)."""
        st, dev = self.settings, batch.input_ids.device
        if not any(p is not None and p.cand_ids.numel() for p in proposals):
            empty = torch.zeros(0, st.tpa_d, st.tpa_top_k, dtype=torch.long, device=dev)
            return attach_candidate_rows(proposals, empty, empty.float())
        none = torch.zeros(0, dtype=torch.long)
        steps = [none if p is None else p.steps(r).cpu() for p, r in zip(proposals, response)]
        cands = [none.view(0, st.tpa_d) if p is None else p.cand_ids.cpu() for p in proposals]
        cp = build_candidate_pass([s.input_ids for s in batch.samples], steps, cands,
                                  cache_length=batch.input_ids.shape[1], pad_id=self.pad_id, dtype=self.model.dtype,
                                  image_token_id=self.image_token_id, device=dev)
        lengths = torch.tensor([s.length for s in batch.samples], device=dev)
        inputs = cp.model_inputs() | {"position_ids": self.family.ribbon_positions(positions, cp.position_ids, lengths)}
        hidden = self.family.decoder(self.model)(**inputs, cache=cache, use_cache=True)[0]  # [B, M, H]
        rows = gather_candidates(cp, hidden)  # [N, d, H]
        n, d = rows.shape[:2]
        ids, lps = topk_logprobs(rows.reshape(n * d, -1), self.lm_head, st.tpa_top_k, self.chunk_size)
        return attach_candidate_rows(proposals, ids.view(n, d, -1), lps.view(n, d, -1))
