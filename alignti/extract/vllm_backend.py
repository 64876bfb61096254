"""Optional vLLM backend for large teachers (`--backend vllm`): every Align-TI signal.

What comes from where:
- response top-k, the IVA top-k_v rows at the salient vision positions, the TPA proposals and
  their teacher log-probs: vLLM's prompt log-probs of the ground-truth sequence;
- each TPA candidate's top-k_t row: one vLLM request per candidate, the prefix `y_<=t` plus the
  candidate, with its next-token log-probs (what the ribbon's candidate row computes, as a
  separate sequence; vLLM's prefix cache shares the prefix);
- IVA saliency: the transformers attention probe (`teacher.plain_pass`) on the teacher cut
  after the IVA layer, since vLLM cannot return attention weights.

vLLM's documented structures: `RequestOutput.prompt_logprobs` is a list over prompt positions
of `None | {token_id: Logprob(logprob, rank, decoded_token)}` with entry i predicting token i
(entry 0 is None); each entry holds the top `prompt_logprobs` tokens (ranks 1..n) plus the
actual token at any rank. `CompletionOutput.logprobs[0]` is the same kind of dict for the first
generated token. Position t of our rows predicts token t+1, so its row is entry t+1.

`vllm` is imported lazily; core code and tests never need it. The end-to-end vLLM path is
untested in CI (no GPU there): the tests drive this module with a fake engine that implements
the documented interface from a transformers model, and compare with the hf backend.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedModel

from alignti.data.batching import Batch
from alignti.data.corpus import load_image
from alignti.data.encode import EncodedSample
from alignti.errors import AlignTIError
from alignti.extract.config import check_vllm_settings
from alignti.extract.signals import choose_tpa_steps, propose_top
from alignti.extract.teacher import plain_pass, salient_positions
from alignti.extract.teacher_output import (
    IvaRows, ResponseRows, TeacherOutput, TpaProposals, TpaRows, attach_candidate_rows, to_sample_signals,
)
from alignti.storage.schema import CacheSettings, SampleSignals

VLLM_DTYPES = {"auto": "auto", "fp32": "float32", "float32": "float32", "bf16": "bfloat16",
               "bfloat16": "bfloat16", "fp16": "float16", "float16": "float16"}

LogprobEntry = Mapping[int, Any]  # {token_id: vllm Logprob}


def ranked_row(entry: LogprobEntry | None, k: int, where: str) -> tuple[list[int], list[float]]:
    """The k best (ids, log-probs) of one vLLM log-prob dict, by vLLM's rank (1 = most likely)."""
    if entry is None:
        raise ValueError(f"vLLM returned no log-probs at {where}")
    ranked = sorted((lp.rank, tok, lp.logprob) for tok, lp in entry.items() if lp.rank is not None and lp.rank <= k)
    if len(ranked) < k:
        raise ValueError(f"vLLM returned {len(ranked)} ranked log-probs at {where}, need {k} "
                           "(set max_logprobs >= top_k)")
    return [tok for _, tok, _ in ranked[:k]], [lp for _, _, lp in ranked[:k]]


def prompt_logprobs_to_topk(prompt_logprobs: Sequence[LogprobEntry | None], positions: Sequence[int],
                            k: int) -> tuple[np.ndarray, np.ndarray]:
    """vLLM prompt log-probs -> (ids int32 [N, k], logprobs float32 [N, k]) for the rows at `positions`.

    The actual prompt token, included by vLLM even when its rank is > k, is dropped unless it is
    in the top k.
    """
    ids = np.zeros((len(positions), k), dtype=np.int32)
    lps = np.zeros((len(positions), k), dtype=np.float32)
    for row, t in enumerate(positions):
        entry = prompt_logprobs[t + 1] if t + 1 < len(prompt_logprobs) else None
        ids[row], lps[row] = ranked_row(entry, k, f"prompt position {t + 1}")
    return ids, lps


def token_logprob(entry: LogprobEntry, token: int, where: str) -> float:
    """log p(token) from one vLLM dict (the actual prompt token is always there)."""
    lp = entry.get(int(token))
    if lp is None:
        raise ValueError(f"vLLM returned no log-prob for token {token} at {where}")
    return float(lp.logprob)


class VllmEngine:
    """The two requests alignti makes of a `vllm.LLM`; `sampling_params` is vLLM's SamplingParams."""

    def __init__(self, llm: Any, sampling_params: type) -> None:
        self.llm = llm
        self.sampling_params = sampling_params

    @classmethod
    def create(cls, teacher: str, max_logprobs: int, dtype: str, max_model_len: int, gpu_memory: float) -> VllmEngine:
        try:
            from vllm import LLM, SamplingParams
        except ImportError:
            raise AlignTIError("--backend vllm needs the optional extra: pip install 'alignti[vllm]'") from None
        llm = LLM(model=teacher, dtype=VLLM_DTYPES.get(dtype, dtype), max_model_len=max_model_len,
                  max_logprobs=max_logprobs, gpu_memory_utilization=gpu_memory, enable_prefix_caching=True,
                  limit_mm_per_prompt={"image": 1})
        return cls(llm, SamplingParams)

    def prompt_rows(self, prompts: list[dict], n: int) -> list[Sequence[LogprobEntry | None]]:
        """Prompt log-probs (top n per position) of each prompt; the prompt must come back unchanged."""
        params = self.sampling_params(max_tokens=1, prompt_logprobs=n, temperature=1.0)
        outs = self.llm.generate(prompts, params, use_tqdm=False)
        for prompt, out in zip(prompts, outs):
            got = getattr(out, "prompt_token_ids", None)
            if got is not None and list(got) != prompt["prompt_token_ids"]:
                raise AlignTIError(f"vLLM changed the prompt ({len(prompt['prompt_token_ids'])} -> {len(got)} tokens): "
                                   "its image expansion differs from the transformers processor's")
        return [out.prompt_logprobs for out in outs]

    def next_rows(self, prompts: list[dict], n: int) -> list[LogprobEntry]:
        """Next-token log-probs (top n) after each prompt."""
        params = self.sampling_params(max_tokens=1, logprobs=n, temperature=1.0)
        return [out.outputs[0].logprobs[0] for out in self.llm.generate(prompts, params, use_tqdm=False)]


def _prompt(ids: list[int], image: Any) -> dict:
    return {"prompt_token_ids": ids, **({"multi_modal_data": {"image": image}} if image is not None else {})}


class VllmTeacher:
    """The vLLM teacher: a batch -> every sample's `SampleSignals`, from a vLLM engine plus, for
    IVA, the transformers teacher cut after the IVA layer."""

    def __init__(self, engine: VllmEngine, settings: CacheSettings, image_root: str, image_token_id: int,
                 saliency_model: PreTrainedModel | None = None) -> None:
        check_vllm_settings(settings.tpa_d, settings.tpa_proposal)
        if settings.iva_layer is not None and saliency_model is None:
            raise ValueError("IVA with the vLLM backend needs the transformers teacher cut after the IVA layer")
        self.engine, self.settings, self.image_root = engine, settings, Path(image_root)
        self.image_token_id = image_token_id
        self.saliency_model = saliency_model

    def __call__(self, batch: Batch) -> list[SampleSignals]:
        st = self.settings
        saliency = None
        if st.iva_layer is not None:
            model = self.saliency_model
            with torch.inference_mode():
                _, saliency = plain_pass(model, batch.to(model.device, model.dtype), st.iva_layer)  # [B, n_v]
        # vLLM preprocesses the images itself from the decoded files.
        images = [load_image(self.image_root / s.image_path).image if s.image_path else None for s in batch.samples]
        n = max(st.top_k, st.iva_top_k if saliency is not None else 0)
        prompts = [_prompt(s.input_ids.tolist(), im) for s, im in zip(batch.samples, images)]
        entries = self.engine.prompt_rows(prompts, n)
        response = [self._response(s, e) for s, e in zip(batch.samples, entries)]
        proposals = [self._proposals(s, e, r) for s, e, r in zip(batch.samples, entries, response)]
        tpa = self._candidate_rows(batch.samples, images, response, proposals)
        iva = [self._iva(s, e, None if saliency is None else saliency[b].float().cpu())
               for b, (s, e) in enumerate(zip(batch.samples, entries))]
        return [to_sample_signals(s, TeacherOutput(response=r, tpa=t, iva=v), st)
                for s, r, t, v in zip(batch.samples, response, tpa, iva)]

    def _response(self, s: EncodedSample, entries: Sequence[LogprobEntry | None]) -> ResponseRows:
        """Top-k rows at the response positions, from one sample's prompt log-probs."""
        resp = s.resp_positions.cpu()
        ids, lps = prompt_logprobs_to_topk(entries, resp.tolist(), self.settings.top_k)
        return ResponseRows(resp, torch.from_numpy(ids).long(), torch.from_numpy(lps))

    def _proposals(self, s: EncodedSample, entries: Sequence[LogprobEntry | None],
                   response: ResponseRows) -> TpaProposals | None:
        """The TPA steps and their d candidates (the teacher's top d), with their prompt log-probs."""
        st, resp = self.settings, response.positions
        if st.tpa_d <= 0 or not resp.numel():
            return None
        targets = s.input_ids.cpu()[resp + 1]
        target_lp = torch.tensor([token_logprob(entries[t + 1], y, f"prompt position {t + 1}")
                                  for t, y in zip(resp.tolist(), targets.tolist())])
        rows = choose_tpa_steps(target_lp, st.tpa_max_positions)
        cands = propose_top(response.topk_ids[rows], targets[rows], st.tpa_d, self.image_token_id)
        cand_lps = torch.tensor([[token_logprob(entries[t + 1], c, f"prompt position {t + 1}") for c in row]
                                 for t, row in zip(resp[rows].tolist(), cands.tolist())]).view(-1, st.tpa_d)
        return TpaProposals(rows, cands, cand_lps)

    def _iva(self, s: EncodedSample, entries: Sequence[LogprobEntry | None],
             saliency: torch.Tensor | None) -> IvaRows | None:
        """Saliency [n_v] and the prompt log-prob rows at the most salient vision positions."""
        if saliency is None or not s.n_v:
            return None
        w = saliency[: s.n_v]
        pos = salient_positions(w, self.settings.iva_max_positions)
        ids, lps = prompt_logprobs_to_topk(entries, (s.vision_start + pos).tolist(), self.settings.iva_top_k)
        return IvaRows(w, pos, torch.from_numpy(ids), torch.from_numpy(lps))

    def _candidate_rows(self, samples: Sequence[EncodedSample], images: list, response: list[ResponseRows],
                        proposals: list[TpaProposals | None]) -> list[TpaRows | None]:
        """One request per candidate: prefix y_<=t + a; its next-token top-k_t is the candidate's row."""
        st = self.settings
        prompts = []
        for s, image, r, p in zip(samples, images, response, proposals):
            if p is None:
                continue
            for step, row in zip(p.steps(r).tolist(), p.cand_ids.tolist()):
                prefix = s.input_ids[: step + 1].tolist()
                prompts += [_prompt(prefix + [c], image) for c in row]
        if not prompts:
            empty = torch.zeros(0, st.tpa_d, st.tpa_top_k, dtype=torch.long)
            return attach_candidate_rows(proposals, empty, empty.float())
        rows = [ranked_row(e, st.tpa_top_k, "a TPA candidate") for e in self.engine.next_rows(prompts, st.tpa_top_k)]
        ids = torch.tensor([r[0] for r in rows], dtype=torch.long).view(-1, st.tpa_d, st.tpa_top_k)
        lps = torch.tensor([r[1] for r in rows], dtype=torch.float32).view(-1, st.tpa_d, st.tpa_top_k)
        return attach_candidate_rows(proposals, ids, lps)
