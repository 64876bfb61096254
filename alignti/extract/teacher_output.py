"""What a teacher backend computes for one sample, as typed torch tensors, and the one function
that turns it into the cache's `SampleSignals`.

Both backends (`teacher.HfTeacher`, `vllm_backend.VllmTeacher`) fill these values; a signal
that is switched off or has nothing to say is `None`, never a missing key, so a backend cannot
drop a signal by misspelling it. Symbols as in `storage/schema.py`: N_r response rows, k top-k,
N_c TPA rows, d candidates, k_t candidate top-k, n_v vision tokens, P salient positions, k_v.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from alignti.data.encode import EncodedSample
from alignti.storage.schema import CacheSettings, SampleSignals


@dataclass(frozen=True)
class ResponseRows:
    """The teacher's top-k rows at the response positions."""

    positions: torch.Tensor  # int64 [N_r] expanded positions whose next token is a response token
    topk_ids: torch.Tensor  # int64 [N_r, k] by descending log-prob
    topk_logprobs: torch.Tensor  # fp32 [N_r, k]


@dataclass(frozen=True)
class TpaProposals:
    """TPA candidates read off the plain pass, before the candidate pass gives their rows."""

    rows: torch.Tensor  # int64 [N_c] indices into the N_r response rows, ascending
    cand_ids: torch.Tensor  # int64 [N_c, d] candidate tokens a_{t,j}
    cand_logprobs: torch.Tensor  # fp32 [N_c, d] teacher log p_T(a_{t,j} | y_<t)

    def steps(self, response: ResponseRows) -> torch.Tensor:
        """int64 [N_c] expanded positions t that get candidates."""
        return response.positions[self.rows]


@dataclass(frozen=True)
class TpaRows:
    """TPA proposals plus each candidate's next-token top-k_t row."""

    proposals: TpaProposals
    topk_ids: torch.Tensor  # int64 [N_c, d, k_t] top-k_t of p_T(. | y_<=t, a_{t,j}), descending
    topk_logprobs: torch.Tensor  # fp32 [N_c, d, k_t]


@dataclass(frozen=True)
class IvaRows:
    """IVA saliency over the vision tokens and the teacher's rows at the most salient ones."""

    saliency: torch.Tensor  # fp32 [n_v] instruction-to-vision weights summing to 1
    positions: torch.Tensor  # int64 [P] indices into the vision tokens, most salient first
    topk_ids: torch.Tensor  # int64 [P, k_v]
    topk_logprobs: torch.Tensor  # fp32 [P, k_v]


@dataclass(frozen=True)
class TeacherOutput:
    """Everything one teacher pass computed for one sample."""

    response: ResponseRows
    tpa: TpaRows | None  # None: TPA off (tpa_d = 0) or no response rows
    iva: IvaRows | None  # None: IVA off (no iva_layer) or a text-only sample


def attach_candidate_rows(proposals: list[TpaProposals | None], topk_ids: torch.Tensor,
                          topk_logprobs: torch.Tensor) -> list[TpaRows | None]:
    """Split the candidate rows of a batch back over its samples, in sample order.

    topk_ids / topk_logprobs: [sum N_c, d, k_t], sample b's N_c rows after those of samples < b.
    """
    counts = [0 if p is None else int(p.rows.numel()) for p in proposals]
    return [None if p is None else TpaRows(p, ids, lps)
            for p, ids, lps in zip(proposals, topk_ids.split(counts), topk_logprobs.split(counts))]


def _array(t: torch.Tensor, dtype: type) -> np.ndarray:
    return t.detach().cpu().numpy().astype(dtype)


def to_sample_signals(s: EncodedSample, out: TeacherOutput, settings: CacheSettings) -> SampleSignals:
    """One sample's `SampleSignals`; an absent TPA or IVA signal becomes empty arrays of the
    schema's shapes ([0, d], [0, d, k_t], [0], [0, k_v])."""
    d, kt, kv = settings.tpa_d, settings.tpa_top_k, settings.iva_top_k
    r, tpa, iva = out.response, out.tpa, out.iva
    return SampleSignals(
        sample_id=s.sample_id, source_id=s.source_id, image_path=s.image_path, image_sha256=s.image_sha256,
        text_ids=s.text_ids, label_spans=s.label_spans, n_v=s.n_v, vision_start=s.vision_start,
        resp_positions=_array(r.positions, np.int32),
        topk_ids=_array(r.topk_ids, np.int32),
        topk_logprobs=_array(r.topk_logprobs, np.float32),
        tpa_rows=_array(tpa.proposals.rows, np.int32) if tpa else np.zeros((0,), np.int32),
        tpa_cand_ids=_array(tpa.proposals.cand_ids, np.int32) if tpa else np.zeros((0, d), np.int32),
        tpa_cand_logprobs=_array(tpa.proposals.cand_logprobs, np.float32) if tpa else np.zeros((0, d), np.float32),
        tpa_topk_ids=_array(tpa.topk_ids, np.int32) if tpa else np.zeros((0, d, kt), np.int32),
        tpa_topk_logprobs=_array(tpa.topk_logprobs, np.float32) if tpa else np.zeros((0, d, kt), np.float32),
        saliency=_array(iva.saliency, np.float32) if iva else np.zeros((0,), np.float32),
        iva_positions=_array(iva.positions, np.int32) if iva else np.zeros((0,), np.int32),
        iva_topk_ids=_array(iva.topk_ids, np.int32) if iva else np.zeros((0, kv), np.int32),
        iva_topk_logprobs=_array(iva.topk_logprobs, np.float32) if iva else np.zeros((0, kv), np.float32),
    )
