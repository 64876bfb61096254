"""Attention probe: instruction-to-vision attention at chosen LM layers, without eager attention.

`alpha_l(x)` (docs/method.md, IRS / IVA) needs the attention probabilities from a few
query rows (the instruction tokens) to a few key columns (the vision tokens) at one or a few
layers. Turning on `output_attentions` would force eager attention everywhere and materialise
every T x T map. Instead a custom attention function, registered under `PROBE_ATTENTION` in
both transformers' `AttentionInterface` and `AttentionMaskInterface`, runs SDPA exactly as the
"sdpa" implementation does and, only at layers with an active request, recomputes
`softmax(q_rows k^T * scaling + mask)` for the requested rows.

Usage:

    with probe_attention(model, layers=[12], queries=[q0, q1], keys=[k0, k1]) as probe:
        model(**batch)
    alpha = probe.result(normalize=True)[12]     # [B, n_keys] fp32, rows sum to 1

With no request active the function is a pure SDPA passthrough, so a model can keep the probe
installed for `generate` and training (`install_probe` / `uninstall_probe`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from alignti.data.encode import EncodedSample

PROBE_ATTENTION = "alignti_probe"
_SLOT = "_alignti_probe_slot"  # attribute set on a probed attention module while a request is active


@dataclass
class _Request:
    """One active probe request, shared by the probed layers of one model.

    `q_index` [B, Qmax] / `q_valid` [B, Qmax]: query rows per sample, right-padded with 0 / False.
    `k_index` [B, K] / `k_valid` [B, K]: key columns per sample, right-padded the same way (samples
    of dynamic-resolution models have different vision-token counts).
    """

    q_index: torch.Tensor
    q_valid: torch.Tensor
    k_index: torch.Tensor
    k_valid: torch.Tensor
    max_q: int
    max_k: int
    keep_graph: bool
    results: dict[int, torch.Tensor] = field(default_factory=dict)
    calls: dict[int, int] = field(default_factory=dict)


def _causal_rows(q_index: torch.Tensor, kv_length: int, offset: int) -> torch.Tensor:
    """Bool [B, Qmax, K]: key j visible from query row i iff j <= i + offset (SDPA's is_causal)."""
    cols = torch.arange(kv_length, device=q_index.device)
    return cols[None, None, :] <= (q_index[:, :, None] + offset)


def _mask_rows(attention_mask: torch.Tensor | None, q_index: torch.Tensor, q_len: int, kv_len: int) -> torch.Tensor:
    """The additive fp32 mask [B, Qmax, K] for the requested rows, whatever form SDPA got it in.

    None means SDPA ran with is_causal (nothing padded), so the causal rows are rebuilt here.
    """
    neg = torch.finfo(torch.float32).min
    b = q_index.shape[0]
    if attention_mask is None:
        allowed = _causal_rows(q_index, kv_len, kv_len - q_len)
        return torch.zeros(allowed.shape, device=q_index.device).masked_fill_(~allowed, neg)
    mask = attention_mask[:, 0].expand(b, q_len, kv_len)  # head dim is 1 for every builder we accept
    rows = mask.gather(1, q_index[:, :, None].expand(b, q_index.shape[1], kv_len))
    if rows.dtype == torch.bool:
        return torch.zeros(rows.shape, device=rows.device).masked_fill_(~rows, neg)
    # a float mask is additive already (0 / dtype min); clamp so fp32 sums cannot overflow to -inf
    return rows.float().clamp(min=neg)


def _probe_rows(query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None,
                scaling: float | None, req: _Request) -> torch.Tensor:
    """Head- and query-averaged attention of the requested rows on the requested columns.

    query [B, H, Q, D], key [B, Hkv, K, D] (after RoPE, before GQA expansion) -> fp32 [B, n_keys].
    """
    b, h, q_len, d = query.shape
    h_kv, kv_len = key.shape[1], key.shape[2]
    if req.max_q >= q_len or req.max_k >= kv_len:
        raise ValueError(f"probe indices out of range: query < {q_len} and key < {kv_len} required")
    device = query.device
    q_index, q_valid, k_index, k_valid = (t.to(device) for t in (req.q_index, req.q_valid, req.k_index, req.k_valid))
    n_q, n_rep = q_index.shape[1], h // h_kv
    rows = query.gather(2, q_index[:, None, :, None].expand(b, h, n_q, d)).float()
    # query head h uses kv head h // n_rep (repeat_kv layout): group rows per kv head, no K copy
    rows = rows.view(b, h_kv, n_rep * n_q, d)
    scale = scaling if scaling is not None else d**-0.5
    scores = (rows @ key.float().transpose(-1, -2)).mul_(scale).view(b, h, n_q, kv_len)
    scores = scores + _mask_rows(attention_mask, q_index, q_len, kv_len)[:, None]
    lse = torch.logsumexp(scores, dim=-1, keepdim=True)
    picked = scores.gather(-1, k_index[:, None, None, :].expand(b, h, n_q, k_index.shape[1]))
    probs = (picked - lse).exp().mean(dim=1)  # [B, Qmax, n_keys], heads averaged
    probs = probs * k_valid[:, None, :]  # a padded key column (index 0) is no key of its sample
    weights = q_valid.float() / q_valid.sum(dim=1, keepdim=True)
    return (probs * weights[:, :, None]).sum(dim=1)


def probe_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """The registered attention function: SDPA, plus the probe at layers with an active request.

    The probe fires only on a full forward (query length == key length, i.e. no cached prefix):
    decode steps of `generate` and cached candidate passes are plain SDPA.
    """
    out = sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
    req: _Request | None = getattr(module, _SLOT, None)
    if req is None or query.shape[2] != key.shape[2]:
        return out
    layer = module.layer_idx
    if query.shape[0] != req.q_index.shape[0]:
        raise ValueError(f"probe got {req.q_index.shape[0]} samples' indices for a batch of {query.shape[0]}")
    if req.keep_graph:
        alpha = _probe_rows(query, key, attention_mask, scaling, req)
    else:
        with torch.no_grad():
            alpha = _probe_rows(query.detach(), key.detach(), attention_mask, scaling, req)
    # a re-run (gradient-checkpoint recomputation) overwrites with identical values
    req.results[layer] = alpha
    req.calls[layer] = req.calls.get(layer, 0) + 1
    return out


def register_probe() -> None:
    """Register the probe under PROBE_ATTENTION with transformers (idempotent).

    `install_probe` calls it; call it yourself before `from_pretrained(attn_implementation=...)`
    names the probe. Without a mask builder under the same name transformers passes no mask at all
    and padding is silently ignored; the SDPA builder gives SDPA exactly what "sdpa" gets.
    """
    AttentionInterface.register(PROBE_ATTENTION, probe_attention_forward)
    AttentionMaskInterface.register(PROBE_ATTENTION, sdpa_mask)


def text_attn_implementation(model: PreTrainedModel) -> str:
    """The attention implementation the language model currently uses."""
    return model.config.get_text_config()._attn_implementation


def _set_text_attn(model: PreTrainedModel, name: str) -> None:
    if "text_config" in getattr(model.config, "sub_configs", {}):
        model.set_attn_implementation({"text_config": name})  # vision tower keeps its own
    else:
        model.set_attn_implementation(name)
    if text_attn_implementation(model) != name:
        raise ValueError(f"could not set the language model's attention to {name!r}")


def install_probe(model: PreTrainedModel) -> str:
    """Switch the language model (only) to the probe attention; returns the previous name.

    Idle, the probe is plain SDPA, so generate and training behave as with "sdpa".
    """
    register_probe()
    previous = text_attn_implementation(model)
    if previous != PROBE_ATTENTION:
        _set_text_attn(model, PROBE_ATTENTION)
    return previous


def uninstall_probe(model: PreTrainedModel, previous: str = "sdpa") -> None:
    """Restore the language model's attention implementation (`install_probe`'s return value)."""
    if previous != text_attn_implementation(model):
        _set_text_attn(model, previous)


def _attention_modules(model: PreTrainedModel) -> dict[int, torch.nn.Module]:
    """Language-model attention modules by `layer_idx` (vision-tower attention is excluded)."""
    cfg = model.config.get_text_config()
    found = {m.layer_idx: m for m in model.modules()
             if hasattr(m, "layer_idx") and getattr(m, "config", None) is cfg and hasattr(m, "num_key_value_groups")}
    if not found:
        raise ValueError(f"{type(model).__name__}: no language-model attention modules with layer_idx found")
    return found


def _pad_indices(per_sample: Sequence[torch.Tensor], what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """List of 1-D index tensors -> right-padded LongTensor [B, max] and validity mask [B, max]."""
    if len(per_sample) == 0:
        raise ValueError(f"probe: empty list of {what}")
    rows = [torch.as_tensor(x, dtype=torch.long).reshape(-1).cpu() for x in per_sample]
    if any(r.numel() == 0 for r in rows):
        raise ValueError(f"probe: every sample needs at least one {what[:-1]} index")
    if any(int(r.min()) < 0 for r in rows):
        raise ValueError(f"probe: negative {what[:-1]} index")
    width = max(r.numel() for r in rows)
    index = torch.zeros(len(rows), width, dtype=torch.long)
    valid = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, r in enumerate(rows):
        index[i, : r.numel()] = r
        valid[i, : r.numel()] = True
    return index, valid


def probe_targets(samples: tuple[EncodedSample, ...]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Query (instruction) and key (vision) positions per sample for the probe.

    A sample with no instruction text (e.g. only `<image>`) queries from the last prompt token,
    the position that predicts the first answer token. Text-only samples get placeholder keys
    (their result is ignored). Each sample keys on its own vision positions, however many.
    """
    queries, keys = [], []
    for s in samples:
        q = s.instruction_positions
        if q.numel() == 0:
            first = s.resp_positions[:1]
            q = first if first.numel() else torch.tensor([s.length - 1])
        queries.append(q)
        keys.append(s.vision_positions[: s.n_v] if s.n_v else torch.zeros(1, dtype=torch.long))
    return queries, keys


@dataclass
class AttentionProbe:
    """Handle returned by `probe_attention`; results are available after the forward."""

    layers: tuple[int, ...]
    _request: _Request

    def result(self, normalize: bool = False) -> dict[int, torch.Tensor]:
        """layer -> fp32 [B, K]: attention of the query rows on the key columns (sample b's n_b
        keys first, then zeros up to K = max n_b).

        Raw (normalize=False): probabilities averaged over heads and query rows (each row of the
        full softmax sums to 1 over all keys, so these sum to <= 1). normalize=True: L1-normalised
        over the requested keys, i.e. docs/method.md's alpha_l(x). With keep_graph the tensors carry
        gradients.
        """
        missing = [layer for layer in self.layers if layer not in self._request.results]
        if missing:
            raise ValueError(f"probe: no full forward reached layer(s) {missing} inside the context")
        out = {layer: self._request.results[layer] for layer in self.layers}
        return {layer: l1_normalize(a) for layer, a in out.items()} if normalize else out

    def calls(self) -> dict[int, int]:
        """How many full forwards each probed layer recorded (the last one wins)."""
        return dict(self._request.calls)


def l1_normalize(alpha: torch.Tensor) -> torch.Tensor:
    """[..., n] non-negative -> rows summing to 1 (tiny floor so an all-zero row stays finite)."""
    return alpha / alpha.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(alpha.dtype).tiny)


@contextmanager
def probe_attention(
    model: PreTrainedModel,
    layers: Sequence[int],
    queries: Sequence[torch.Tensor],
    keys: Sequence[torch.Tensor],
    keep_graph: bool = False,
) -> Iterator[AttentionProbe]:
    """Record instruction-to-vision attention at `layers` during forwards run inside the block.

    queries[b]: LongTensor [n_q_b] of query positions of sample b (e.g. instruction tokens);
    keys[b]: LongTensor [n_keys_b] of key positions (e.g. the sample's n_v vision tokens; counts may
    differ between samples). Positions index the padded batch as fed to the model (left padding shifts
    them). Query rows must be real (unpadded) tokens. The probe fires on full forwards only.
    keep_graph=False computes under no_grad (teacher / extraction); keep_graph=True keeps the
    autograd graph so a loss on the result trains q/k projections (student, iva_target=attention;
    with gradient checkpointing use the non-reentrant variant, whose recomputation re-runs the
    probe identically). Installs the probe for the block if the model does not use it already.
    """
    key_index, key_valid = _pad_indices(keys, "keys")
    q_index, q_valid = _pad_indices(queries, "queries")
    if q_index.shape[0] != key_index.shape[0]:
        raise ValueError(f"probe: {q_index.shape[0]} query lists but {key_index.shape[0]} key lists")
    modules = _attention_modules(model)
    layers = tuple(int(layer) for layer in layers)
    bad = [layer for layer in layers if layer not in modules]
    if not layers or bad:
        raise ValueError(f"probe: layers {bad or '[]'} not in the model's LM layers 0..{max(modules)}")
    if any(getattr(modules[layer], _SLOT, None) is not None for layer in layers):
        raise ValueError("probe: a probe is already active on this model")
    request = _Request(q_index, q_valid, key_index, key_valid, int(q_index.max()), int(key_index.max()), keep_graph)
    previous = install_probe(model)
    for layer in layers:
        setattr(modules[layer], _SLOT, request)
    try:
        yield AttentionProbe(layers, request)
    finally:
        for layer in layers:
            setattr(modules[layer], _SLOT, None)
        uninstall_probe(model, previous)
