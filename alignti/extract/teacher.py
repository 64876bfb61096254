"""One batch through the teacher -> every sample's Align-TI signals (`SampleSignals`).

Two teacher passes per batch (design.md sections 2 and 9):
1. the plain forward over the right-padded ground truth, with the attention probe at the IVA
   layer and a KV cache: response top-k rows, saliency, vision-position rows, TPA proposals;
2. the candidate pass on top of that cache (the ribbon's teacher-side shortcut): each
   candidate's top-k_t row.
The LM head is applied to the needed rows only, in chunks (`signals.py`).
"""

from __future__ import annotations

from contextlib import nullcontext

import numpy as np
import torch
from transformers import DynamicCache, PreTrainedModel

from alignti.data.batching import Batch
from alignti.data.encode import EncodedSample
from alignti.models.probe import probe_attention, probe_targets
from alignti.models.ribbon import build_candidate_pass, gather_candidates
from alignti.extract.signals import (
    choose_tpa_steps, gather_logprobs, propose_sample, propose_top, sample_seed, topk_logprobs,
)
from alignti.storage.schema import CacheSettings, SampleSignals


def plain_pass(model: PreTrainedModel, batch: Batch, iva_layer: int | None,
               cache: DynamicCache | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The teacher's forward over the (right-padded) ground truth, with the attention probe at
    `iva_layer`: (final hidden [B, T, H], saliency [B, n_v] normalised per sample, or None).

    Also the saliency source of the vLLM backend, where `model` is the teacher cut after
    `iva_layer` (its hidden states are then unused).
    """
    n_v = max(s.n_v for s in batch.samples)
    probe_ctx = nullcontext(None)
    if iva_layer is not None and n_v > 0:
        queries, keys = probe_targets(batch.samples, n_v)
        probe_ctx = probe_attention(model, [iva_layer], queries, keys)
    with probe_ctx as probe:
        hidden = model.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                             pixel_values=batch.pixel_values, cache=cache, use_cache=cache is not None)[0]
    return hidden, (probe.result(normalize=True)[iva_layer] if probe is not None else None)


def salient_positions(saliency: torch.Tensor, max_positions: int) -> torch.Tensor:
    """The P most salient vision positions, most salient first. saliency: [n_v] -> int64 [min(P, n_v)]."""
    return torch.topk(saliency, min(max_positions, saliency.shape[0])).indices


def signals_from_parts(s: EncodedSample, p: dict, st: CacheSettings) -> SampleSignals:
    """One sample's `SampleSignals` from its tensors (keys as filled by either backend; a
    missing key is an empty signal of the right shape)."""
    d, kt, kv = st.tpa_d, st.tpa_top_k, st.iva_top_k

    def arr(t: torch.Tensor | None, shape: tuple[int, ...], dtype: type) -> np.ndarray:
        return np.zeros(shape, dtype=dtype) if t is None else t.detach().cpu().numpy().astype(dtype)

    return SampleSignals(
        sample_id=s.sample_id, source_id=s.source_id, image_path=s.image_path, image_sha256=s.image_sha256,
        text_ids=s.text_ids, label_spans=s.label_spans, n_v=s.n_v, vision_start=s.vision_start,
        resp_positions=arr(p["resp"], (0,), np.int32),
        topk_ids=arr(p["topk_ids"], (0, st.top_k), np.int32),
        topk_logprobs=arr(p["topk_lps"], (0, st.top_k), np.float32),
        tpa_rows=arr(p.get("tpa_rows"), (0,), np.int32),
        tpa_cand_ids=arr(p.get("cands"), (0, d), np.int32),
        tpa_cand_logprobs=arr(p.get("cand_lps"), (0, d), np.float32),
        tpa_topk_ids=arr(p.get("tpa_ids"), (0, d, kt), np.int32),
        tpa_topk_logprobs=arr(p.get("tpa_lps"), (0, d, kt), np.float32),
        saliency=arr(p.get("saliency"), (0,), np.float32),
        iva_positions=arr(p.get("iva_pos"), (0,), np.int32),
        iva_topk_ids=arr(p.get("iva_ids"), (0, kv), np.int32),
        iva_topk_logprobs=arr(p.get("iva_lps"), (0, kv), np.float32),
    )


class TeacherSignals:
    """Computes `SampleSignals` for batches with one teacher and one set of settings."""

    def __init__(self, model: PreTrainedModel, settings: CacheSettings, pad_id: int, chunk_size: int = 256) -> None:
        self.model = model
        self.settings = settings
        self.pad_id = pad_id
        self.chunk_size = chunk_size
        self.lm_head = model.get_output_embeddings()
        self.image_token_id = model.config.image_token_id

    @torch.inference_mode()
    def __call__(self, batch: Batch) -> list[SampleSignals]:
        batch = batch.to(self.model.device, self.model.dtype)
        cache = DynamicCache(config=self.model.config.get_text_config())
        hidden, saliency = plain_pass(self.model, batch, self.settings.iva_layer, cache)
        parts = [self._sample(b, s, hidden[b], saliency) for b, s in enumerate(batch.samples)]
        self._candidate_rows(batch, parts, cache)
        return [signals_from_parts(s, p, self.settings) for s, p in zip(batch.samples, parts)]

    def _sample(self, b: int, s: EncodedSample, hidden: torch.Tensor, saliency: torch.Tensor | None) -> dict:
        """Signals read off the plain pass for one sample. hidden: [T, H]."""
        st, dev = self.settings, hidden.device
        resp = s.resp_positions.to(dev)
        ids, lps = topk_logprobs(hidden[resp], self.lm_head, st.top_k, self.chunk_size)
        out = {"resp": resp, "topk_ids": ids, "topk_lps": lps}
        targets = s.input_ids.to(dev)[resp + 1]
        if st.tpa_d > 0 and resp.numel():
            target_lp = gather_logprobs(hidden[resp], self.lm_head, targets[:, None], self.chunk_size)[:, 0]
            rows = choose_tpa_steps(target_lp, st.tpa_max_positions)
            if st.tpa_proposal == "top":
                cands = propose_top(ids[rows], targets[rows], st.tpa_d, self.image_token_id)
            else:
                cands = propose_sample(hidden[resp[rows]], self.lm_head, targets[rows], st.tpa_d,
                                       sample_seed(st.seed, s.sample_id), self.image_token_id)
            out.update(tpa_rows=rows, cands=cands,
                       cand_lps=gather_logprobs(hidden[resp[rows]], self.lm_head, cands, self.chunk_size))
        if saliency is not None and s.n_v:
            w = saliency[b, : s.n_v].float()
            pos = salient_positions(w, st.iva_max_positions)
            vids, vlps = topk_logprobs(hidden[s.vision_start + pos], self.lm_head, st.iva_top_k, self.chunk_size)
            out.update(saliency=w, iva_pos=pos, iva_ids=vids, iva_lps=vlps)
        return out

    def _candidate_rows(self, batch: Batch, parts: list[dict], cache: DynamicCache) -> None:
        """Run every sample's candidates on top of the plain pass's cache; add their top-k_t rows."""
        st = self.settings
        if st.tpa_d <= 0 or not any("cands" in p and p["cands"].numel() for p in parts):
            return
        dev = batch.input_ids.device
        steps = [p["resp"][p["tpa_rows"]] if "cands" in p else torch.zeros(0, dtype=torch.long, device=dev)
                 for p in parts]
        cands = [p["cands"] if "cands" in p else torch.zeros(0, st.tpa_d, dtype=torch.long, device=dev)
                 for p in parts]
        cp = build_candidate_pass([s.input_ids for s in batch.samples], [x.cpu() for x in steps],
                                  [c.cpu() for c in cands], cache_length=batch.input_ids.shape[1],
                                  pad_id=self.pad_id, dtype=self.model.dtype, image_token_id=self.image_token_id,
                                  device=dev)
        hidden = self.model.model(**cp.model_inputs(), cache=cache, use_cache=True)[0]  # [B, M, H]
        rows = gather_candidates(cp, hidden)  # [N, d, H]
        n, d = rows.shape[:2]
        ids, lps = topk_logprobs(rows.reshape(n * d, -1), self.lm_head, st.tpa_top_k, self.chunk_size)
        counts = [int(s.numel()) for s in steps]
        for p, ids_b, lps_b in zip(parts, ids.view(n, d, -1).split(counts), lps.view(n, d, -1).split(counts)):
            p["tpa_ids"], p["tpa_lps"] = ids_b, lps_b

