"""A stand-in for `vllm.LLM` that implements its documented offline interface from a transformers
model, so the vLLM backend's orchestration runs in CI (where vLLM and GPUs are absent).

Mirrors vLLM's structures: `generate(prompts, SamplingParams)` -> outputs with
`prompt_token_ids`, `prompt_logprobs` (entry 0 None; entry i = {token: Logprob} for the top-n
tokens predicting token i, plus the actual token i at whatever rank it has) and
`outputs[0].logprobs[0]` (top-n of the next token, plus the sampled one).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import torch

from tests.helpers.families import own_inputs


@dataclass
class Logprob:  # vllm.logprobs.Logprob
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class SamplingParams:  # the fields of vllm.SamplingParams that alignti sets
    max_tokens: int = 16
    temperature: float = 1.0
    logprobs: int | None = None
    prompt_logprobs: int | None = None


def _entry(logp: torch.Tensor, n: int, actual: int) -> dict[int, Logprob]:
    """logp: [V] -> vLLM's dict: the top n by rank, plus `actual` at its own rank."""
    order = torch.argsort(logp, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(1, order.numel() + 1)
    toks = order[:n].tolist() + ([actual] if actual not in order[:n].tolist() else [])
    return {t: Logprob(float(logp[t]), int(rank[t])) for t in toks}


class FakeLLM:
    """`LLM.generate` computed by `model` (fp32, one prompt at a time) with the images processed by `parts`
    (its `ModelParts`) and the model's own positions (vLLM computes Qwen-VL's M-RoPE itself)."""

    def __init__(self, model, parts, max_logprobs: int) -> None:
        self.model, self.parts, self.max_logprobs = model.eval(), parts, max_logprobs
        self.requests = 0

    @torch.inference_mode()
    def generate(self, prompts: list[dict], params: SamplingParams, use_tqdm: bool = True) -> list:
        for n in (params.logprobs, params.prompt_logprobs):
            if n is not None and n > self.max_logprobs:
                raise ValueError(f"Requested {n} logprobs > max_logprobs {self.max_logprobs}")  # as vLLM does
        return [self._one(p, params) for p in prompts]

    def _one(self, prompt: dict, params: SamplingParams) -> SimpleNamespace:
        self.requests += 1
        ids = torch.tensor(prompt["prompt_token_ids"])[None]
        images = None
        if "multi_modal_data" in prompt:
            images = self.parts.encode_images([prompt["multi_modal_data"]["image"]])
        logp = torch.log_softmax(self.model(**own_inputs(self.model, ids[0], images)).logits[0].float(), -1)  # [T, V]
        plp = None
        if params.prompt_logprobs is not None:
            plp = [None] + [_entry(logp[i - 1], params.prompt_logprobs, int(ids[0, i])) for i in range(1, ids.shape[1])]
        nxt = int(logp[-1].argmax())
        out = SimpleNamespace(token_ids=[nxt], logprobs=None)
        if params.logprobs is not None:
            out.logprobs = [_entry(logp[-1], params.logprobs, nxt)]
        return SimpleNamespace(prompt_token_ids=ids[0].tolist(), prompt_logprobs=plp, outputs=[out])
