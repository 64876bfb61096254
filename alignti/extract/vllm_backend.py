"""Optional vLLM backend for the response top-k signal of large teachers (`--backend vllm`).

vLLM returns, per prompt position i, a dict {token_id: Logprob(logprob, rank, decoded_token)}
holding the top `prompt_logprobs` tokens predicting token i (ranks 1..k) plus the actual
token i (any rank); entry 0 is None. Position t of our response rows predicts token t+1, so
its row is entry t+1. vLLM cannot return attention weights and alignti does not route TPA
candidate rows through it, so this backend writes the KD signal only: it refuses IVA and TPA
settings with a clear message. `vllm` is imported lazily; core code and tests never need it.

The end-to-end vLLM path is untested in CI (no GPU there); `prompt_logprobs_to_topk` is unit-
tested with recorded structures of the documented shape.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from alignti.data.batching import Batch
from alignti.data.corpus import load_image
from alignti.data.encode import EncodedSample
from alignti.errors import AlignTIError
from alignti.storage.schema import CacheSettings, SampleSignals


def prompt_logprobs_to_topk(prompt_logprobs: Sequence[Mapping[int, Any] | None], positions: Sequence[int],
                            k: int) -> tuple[np.ndarray, np.ndarray]:
    """vLLM prompt log-probs -> (ids int32 [N, k], logprobs float32 [N, k]) at `positions`.

    Entries are ordered by vLLM's rank (1 = most likely); the actual prompt token, included by
    vLLM even when its rank is > k, is dropped unless it is in the top k.
    """
    ids = np.zeros((len(positions), k), dtype=np.int32)
    lps = np.zeros((len(positions), k), dtype=np.float32)
    for row, t in enumerate(positions):
        entry = prompt_logprobs[t + 1] if t + 1 < len(prompt_logprobs) else None
        if entry is None:
            raise AlignTIError(f"vLLM returned no prompt log-probs for position {t + 1}")
        ranked = sorted(((lp.rank, tok, lp.logprob) for tok, lp in entry.items() if lp.rank is not None and lp.rank <= k))
        if len(ranked) < k:
            raise AlignTIError(f"vLLM returned {len(ranked)} ranked log-probs at position {t + 1}, need {k} "
                               "(set max_logprobs >= top_k)")
        ids[row] = [tok for _, tok, _ in ranked[:k]]
        lps[row] = [lp for _, _, lp in ranked[:k]]
    return ids, lps


def check_vllm_settings(settings: CacheSettings) -> None:
    """The vLLM backend writes response top-k only."""
    if settings.tpa_d or settings.iva_layer is not None:
        raise AlignTIError("--backend vllm writes the KD signal only: pass --tpa-d 0 --iva-layer none, "
                           "or use --backend hf for IVA and TPA")


class VllmTopK:
    """Response top-k rows from a vLLM engine (GPU). Construct once per extraction."""

    def __init__(self, teacher: str, settings: CacheSettings, dtype: str = "auto", max_model_len: int = 4096) -> None:
        check_vllm_settings(settings)
        try:
            from vllm import LLM, SamplingParams
        except ImportError:
            raise AlignTIError("--backend vllm needs the optional extra: pip install 'alignti[vllm]'") from None
        self.settings = settings
        self.llm = LLM(model=teacher, dtype=dtype, max_model_len=max_model_len, max_logprobs=settings.top_k,
                       limit_mm_per_prompt={"image": 1})
        self.params = SamplingParams(max_tokens=1, prompt_logprobs=settings.top_k, temperature=1.0)

    def __call__(self, batch: Batch, image_root: str) -> list[SampleSignals]:
        """Signals for a batch; images are re-read from `image_root` (vLLM preprocesses them itself)."""
        samples = batch.samples
        images = [load_image(Path(image_root) / s.image_path).image if s.image_path else None for s in samples]
        prompts = [{"prompt_token_ids": s.input_ids.tolist(), **({"multi_modal_data": {"image": im}} if im else {})}
                   for s, im in zip(samples, images)]
        outputs = self.llm.generate(prompts, self.params, use_tqdm=False)
        return [self._signals(s, out.prompt_logprobs) for s, out in zip(samples, outputs)]

    def _signals(self, s: EncodedSample, prompt_logprobs: Sequence) -> SampleSignals:
        k = self.settings.top_k
        resp = s.resp_positions.numpy().astype(np.int32)
        ids, lps = prompt_logprobs_to_topk(prompt_logprobs, resp.tolist(), k)
        z = np.zeros
        return SampleSignals(
            sample_id=s.sample_id, source_id=s.source_id, image_path=s.image_path, image_sha256=s.image_sha256,
            text_ids=s.text_ids, label_spans=s.label_spans, n_v=s.n_v, vision_start=s.vision_start,
            resp_positions=resp, topk_ids=ids, topk_logprobs=lps, tpa_rows=z((0,), np.int32),
            tpa_cand_ids=z((0, 0), np.int32), tpa_cand_logprobs=z((0, 0), np.float32),
            tpa_topk_ids=z((0, 0, self.settings.tpa_top_k), np.int32),
            tpa_topk_logprobs=z((0, 0, self.settings.tpa_top_k), np.float32), saliency=z((0,), np.float32),
            iva_positions=z((0,), np.int32), iva_topk_ids=z((0, self.settings.iva_top_k), np.int32),
            iva_topk_logprobs=z((0, self.settings.iva_top_k), np.float32))
