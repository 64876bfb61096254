"""One distillation micro-batch: student model inputs plus every loss term's rows and teacher targets.

Layout. Without TPA the samples are right-padded (`collate`). With TPA (weight > 0 and cached
candidates present) the student gets the ribbon built by `alignti.models.ribbon.build_ribbon`,
the function extraction uses, with the cached candidates inserted after their steps: one forward
gives the ground-truth rows and every candidate row p_S(.|y_<=t, a). The batch keeps the plain
right-padded ids and mask too: the student's family numbers the ribbon's slots from the plain
batch's positions (`Family.ribbon_positions`; M-RoPE triples for Qwen-VL), in `Objective`.

Rows. Every loss row is a flat index `b * W + w` into the model's hidden states reshaped to
[B * W, H] (W = padded width, ground truth or ribbon), so the step applies the LM head only to
those rows. Teacher arrays are concatenated over samples in batch order, row for row.

Counts are computed here, on the host, with the same rules as the loss functions, so the
trainer can all-reduce them before the forward and divide once by global counts.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
import torch

from alignti.data.batching import collate
from alignti.data.images import move_images
from alignti.distill.config import LossConfig
from alignti.distill.examples import DistillExample
from alignti.distill.grounding import grounding_target
from alignti.models.ribbon import build_ribbon
from alignti.models.probe import probe_targets

_LONG = torch.long


@dataclass(frozen=True)
class DistillBatch:
    """Model inputs and loss targets of B samples, all on one device.

    W: padded width (max T_b plain; max T_b + n_b * d ribbon). N: response rows (positions whose
    next token is labelled); k, k_v, k_t: teacher top-k widths; M: salient vision rows; S: samples
    with saliency (iva_target=attention); S_g: samples with a grounding target; N_c: TPA steps, d candidates each. A term whose weight
    is 0 (or that has no data) has zero rows.
    """

    input_ids: torch.Tensor  # long [B, W]
    attention_mask: torch.Tensor  # long [B, W] (plain) or model dtype [B, 1, W, W] additive (ribbon)
    position_ids: torch.Tensor | None  # long [B, W] (ribbon: original position of each slot) or None (plain)
    plain_input_ids: torch.Tensor  # long [B, T] the right-padded ground truth (== input_ids when plain)
    plain_attention_mask: torch.Tensor  # long [B, T]
    lengths: torch.Tensor  # long [B] ground-truth lengths T_b
    images: dict[str, torch.Tensor]  # the model's image inputs (pixels in model dtype), {} without images
    labels: torch.Tensor  # long [B, T] ground-truth labels at original positions (IGNORE_INDEX elsewhere)
    resp_rows: torch.Tensor  # long [N] flat row of each response position
    resp_targets: torch.Tensor  # long [N] its labelled next token
    kd_ids: torch.Tensor  # long [N, k] teacher top-k ids ([0, 1] without KD)
    kd_logprobs: torch.Tensor  # fp32 [N, k]
    iva_rows: torch.Tensor  # long [M] flat rows of the salient vision positions
    iva_ids: torch.Tensor  # long [M, k_v]
    iva_logprobs: torch.Tensor  # fp32 [M, k_v]
    iva_weights: torch.Tensor  # fp32 [M] teacher saliency w at those positions
    iva_sample: torch.Tensor  # long [M] sample of each row, in [0, B)
    attn_queries: tuple[torch.Tensor, ...]  # B x long [n_q_b] probe query positions (W coordinates)
    attn_keys: tuple[torch.Tensor, ...]  # B x long [n_v_b] probe key (vision) positions
    attn_saliency: torch.Tensor  # fp32 [S, K] cached saliency of the samples in attn_sample (K = max n_v_b, 0-padded)
    attn_sample: torch.Tensor  # long [S]
    ground_target: torch.Tensor  # fp32 [S_g, K] box-annotation target (grounding) of ground_sample, 0-padded
    ground_sample: torch.Tensor  # long [S_g]
    tpa_rows: torch.Tensor  # long [N_c * d] flat rows of the candidates, step-major (their input ids: the candidates)
    tpa_step_rows: torch.Tensor  # long [N_c] flat ground-truth row t of each step (its next token is y_{t+1})
    tpa_ids: torch.Tensor  # long [N_c * d, k_t] teacher top-k_t of p_T(.|y_<=t, a)
    tpa_logprobs: torch.Tensor  # fp32 [N_c * d, k_t]
    tpa_cand_logprobs: torch.Tensor  # fp32 [N_c, d] log p_T(a | y_<=t); -inf = masked candidate
    num_samples: int
    num_tokens: int  # real ground-truth tokens (tokens/s)
    max_input_id: int  # largest id fed to the embedding (checked against the student's vocab)
    sample_ids: tuple[str, ...]
    term_counts: dict[str, float] = field(default_factory=dict)  # see counts()

    @property
    def is_ribbon(self) -> bool:
        return self.position_ids is not None

    def counts(self) -> dict[str, float]:
        """{"sft": labelled targets, "kd": response rows, "iva": samples with IVA rows, "tpa": TPA steps,
        "ground": samples with a grounding target}.

        Equal to the counts the loss functions return for this batch; known before the forward.
        """
        return dict(self.term_counts)


def _cat(arrays: list[np.ndarray], shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Concatenate per-sample numpy arrays along axis 0 (an empty list gives `shape`)."""
    parts = [np.asarray(a) for a in arrays if np.asarray(a).shape[0] > 0]
    if not parts:
        return torch.zeros(shape, dtype=dtype)
    return torch.from_numpy(np.concatenate(parts, axis=0)).to(dtype)


def _tpa_inputs(examples: list[DistillExample], has_images: bool, image_token_id: int, pad_id: int,
                vocab_size: int | None) -> tuple[list, list, list]:
    """Per-sample TPA steps (student positions), candidate ids and candidate log-probs.

    Candidates the student cannot take as input are masked (id -> pad, log-prob -inf, so their
    weight is 0): ids >= the student's vocab (padded teacher vocab) and, when the batch has
    images, the image token (it would be merged with image features; extract never proposes it).
    """
    steps, cands, cand_lps = [], [], []
    for e in examples:
        sig = e.signals
        resp = e.student.resp_positions
        steps.append(resp[torch.from_numpy(sig.tpa_rows.astype(np.int64))])
        ids = torch.from_numpy(sig.tpa_cand_ids.astype(np.int64))
        lps = torch.from_numpy(sig.tpa_cand_logprobs.astype(np.float32))
        bad = ids < 0
        if vocab_size is not None:
            bad |= ids >= vocab_size
        if has_images:
            bad |= ids == image_token_id
        cands.append(torch.where(bad, pad_id, ids))
        cand_lps.append(torch.where(bad, float("-inf"), lps))
    return steps, cands, cand_lps


def _layout(examples: list[DistillExample], pad_id: int, image_token_id: int, use_ribbon: bool,
            vocab_size: int | None, dtype: torch.dtype) -> dict:
    """Model inputs plus `gt` (long [B, T]: W-coordinate of each original position) and TPA parts."""
    samples = [e.student for e in examples]
    plain = collate(samples, pad_id)
    out = {"labels": plain.labels, "images": plain.images, "tpa": None, "plain_input_ids": plain.input_ids,
           "plain_attention_mask": plain.attention_mask}
    if not use_ribbon:
        width = plain.input_ids.shape[1]
        out.update(input_ids=plain.input_ids, attention_mask=plain.attention_mask, position_ids=None,
                   gt=torch.arange(width).expand(len(samples), width), width=width)
        return out
    steps, cands, cand_lps = _tpa_inputs(examples, bool(plain.images), image_token_id, pad_id, vocab_size)
    ribbon = build_ribbon([s.input_ids for s in samples], steps, cands, pad_id, dtype=dtype,
                          image_token_id=image_token_id if plain.images else None)
    width = ribbon.input_ids.shape[1]
    flat = ribbon.cand_batch[:, None] * width + ribbon.cand_index  # [N_c, d]
    # the ground-truth row each step's candidates stand in for: p(. | y_<=t) there proposes them
    step_rows = ribbon.cand_batch * width + ribbon.gt_index[ribbon.cand_batch, ribbon.cand_step]  # [N_c]
    out.update(input_ids=ribbon.input_ids, attention_mask=ribbon.attention_mask, position_ids=ribbon.position_ids,
               gt=ribbon.gt_index, width=width, tpa=(flat.reshape(-1), step_rows, torch.cat(cand_lps)))
    return out


def _resp_part(examples: list[DistillExample], lay: dict, with_kd: bool) -> dict:
    width, rows, targets = lay["width"], [], []
    for b, e in enumerate(examples):
        pos = e.student.resp_positions
        rows.append(b * width + lay["gt"][b, pos])
        targets.append(e.student.input_ids[pos + 1])
    out = {"resp_rows": torch.cat(rows), "resp_targets": torch.cat(targets)}
    sigs = [e.signals for e in examples] if with_kd else []
    k = sigs[0].topk_ids.shape[1] if sigs else 1
    out["kd_ids"] = _cat([s.topk_ids for s in sigs], (0, k), _LONG)
    out["kd_logprobs"] = _cat([s.topk_logprobs for s in sigs], (0, k), torch.float32)
    return out


def _iva_rows(examples: list[DistillExample], lay: dict, enabled: bool) -> dict:
    """IVA (logits target): the P salient vision rows of each sample and their teacher rows."""
    width = lay["width"]
    rows, samples, weights, ids, lps = [], [], [], [], []
    kv = 1
    for b, e in enumerate(examples):
        sig = e.signals
        if not enabled or sig is None or sig.iva_positions.size == 0:
            continue
        kv = sig.iva_topk_ids.shape[1]
        _require_same_grid(e)
        pos = torch.from_numpy(sig.iva_positions.astype(np.int64))
        rows.append(b * width + lay["gt"][b, e.student.vision_start + pos])
        samples.append(torch.full((pos.numel(),), b, dtype=_LONG))
        weights.append(torch.from_numpy(sig.saliency[sig.iva_positions].astype(np.float32)))
        ids.append(sig.iva_topk_ids)
        lps.append(sig.iva_topk_logprobs)
    empty = torch.zeros(0, dtype=_LONG)
    return {"iva_rows": torch.cat(rows) if rows else empty, "iva_sample": torch.cat(samples) if samples else empty,
            "iva_weights": torch.cat(weights) if weights else torch.zeros(0),
            "iva_ids": _cat(ids, (0, kv), _LONG), "iva_logprobs": _cat(lps, (0, kv), torch.float32)}


def _probe_positions(examples: list[DistillExample], lay: dict, enabled: bool) -> dict:
    """Probe queries (instruction tokens) and keys (vision tokens) of every sample, W coordinates."""
    if not enabled:
        return {"attn_queries": (), "attn_keys": ()}
    queries, keys = probe_targets(tuple(e.student for e in examples))  # the teacher's own rule
    gt = lay["gt"]
    return {"attn_queries": tuple(gt[b, q] for b, q in enumerate(queries)),
            "attn_keys": tuple(gt[b, k] if examples[b].student.n_v else k for b, k in enumerate(keys))}


def _attention_targets(examples: list[DistillExample], enabled: bool) -> dict:
    """IVA (attention target): cached saliency of the samples that have it."""
    chosen = [b for b, e in enumerate(examples) if enabled and e.signals is not None and e.signals.saliency.size]
    for b in chosen:
        _require_same_grid(examples[b])
    return {"attn_saliency": _padded_rows([examples[b].signals.saliency for b in chosen], examples),
            "attn_sample": torch.tensor(chosen, dtype=_LONG)}


def _padded_rows(rows: list[np.ndarray], examples: list[DistillExample]) -> torch.Tensor:
    """fp32 [S, K]: per-sample vectors over their own n_v vision tokens, 0-padded to K = max n_v of the
    batch (the probe's key width: its results are 0 there too)."""
    width = max(e.student.n_v for e in examples)
    out = torch.zeros(len(rows), width if rows else 0)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.from_numpy(np.asarray(r, dtype=np.float32))
    return out


def _ground_targets(examples: list[DistillExample], enabled: bool) -> dict:
    """Grounding: box-annotation targets [S_g, n_v] of the samples that have one."""
    targets = [grounding_target(e.student) for e in examples] if enabled else []
    chosen = [b for b, t in enumerate(targets) if t is not None]
    return {"ground_target": _padded_rows([targets[b] for b in chosen], examples),
            "ground_sample": torch.tensor(chosen, dtype=_LONG)}


def _require_same_grid(e: DistillExample) -> None:
    if e.signals.n_v != e.student.n_v:
        raise ValueError(f"sample {e.signals.sample_id}: IVA needs the student's vision-token count "
                           f"({e.student.n_v}) to equal the teacher's ({e.signals.n_v}); set --iva-weight 0")


def _tpa_part(examples: list[DistillExample], lay: dict) -> dict:
    sigs = [e.signals for e in examples if e.signals is not None]
    d = max((s.tpa_cand_ids.shape[1] for s in sigs), default=1) or 1
    kt = max((s.tpa_topk_ids.shape[2] for s in sigs if s.tpa_topk_ids.ndim == 3), default=1) or 1
    if lay["tpa"] is None:
        return {"tpa_rows": torch.zeros(0, dtype=_LONG), "tpa_step_rows": torch.zeros(0, dtype=_LONG),
                "tpa_ids": torch.zeros(0, kt, dtype=_LONG), "tpa_logprobs": torch.zeros(0, kt),
                "tpa_cand_logprobs": torch.zeros(0, d)}
    rows, step_rows, cand_lps = lay["tpa"]
    return {"tpa_rows": rows, "tpa_step_rows": step_rows, "tpa_cand_logprobs": cand_lps,
            "tpa_ids": _cat([s.tpa_topk_ids.reshape(-1, kt) for s in sigs], (0, kt), _LONG),
            "tpa_logprobs": _cat([s.tpa_topk_logprobs.reshape(-1, kt) for s in sigs], (0, kt), torch.float32)}


def _counts(parts: dict, weights: dict[str, float], attention: bool) -> dict[str, float]:
    """Counts by the loss functions' rules (kd: rows; iva: samples with rows; tpa: steps with a real candidate)."""
    iva = float(parts["attn_sample"].numel()) if attention else float(parts["iva_sample"].unique().numel())
    tpa = float(torch.isfinite(parts["tpa_cand_logprobs"]).any(-1).sum()) if weights["tpa"] > 0 else 0.0
    return {"sft": float(parts["resp_rows"].numel()), "kd": float(parts["kd_ids"].shape[0]), "iva": iva, "tpa": tpa,
            "ground": float(parts["ground_sample"].numel())}


def build_distill_batch(examples: list[DistillExample], pad_id: int, image_token_id: int, loss_cfg: LossConfig,
                        device: torch.device | str, dtype: torch.dtype, *,
                        vocab_size: int | None = None) -> DistillBatch:
    """Build the micro-batch of `examples` on `device` (pixel values and ribbon mask in `dtype`).

    Teacher rows are built only for terms with weight > 0. The ribbon is used when the TPA
    weight is > 0 and some sample has cached candidates, plain right padding otherwise.
    vocab_size (the student's, optional): candidates at or above it are masked instead of
    crashing the embedding. ValueError if a teacher term is weighted but a sample has no signals.
    """
    if not examples:
        raise ValueError("build_distill_batch: empty batch")
    w = loss_cfg.weights()
    teacher_terms = [n for n in ("kd", "iva", "tpa") if w[n] > 0]
    if teacher_terms and any(e.signals is None for e in examples):
        raise ValueError(f"loss terms {teacher_terms} need teacher signals from a cache (--cache); a corpus alone "
                           f"supports --recipe sft only")
    attention = loss_cfg.iva_target == "attention"
    use_ribbon = w["tpa"] > 0 and any(e.signals.tpa_cand_ids.shape[0] > 0 for e in examples)
    lay = _layout(examples, pad_id, image_token_id, use_ribbon, vocab_size, dtype)
    parts = {**_resp_part(examples, lay, w["kd"] > 0), **_iva_rows(examples, lay, w["iva"] > 0 and not attention),
             **_probe_positions(examples, lay, (w["iva"] > 0 and attention) or w["ground"] > 0),
             **_attention_targets(examples, w["iva"] > 0 and attention), **_ground_targets(examples, w["ground"] > 0),
             **_tpa_part(examples, lay)}
    counts = _counts(parts, w, attention)
    dev = torch.device(device)

    def move(t: torch.Tensor) -> torch.Tensor:
        return t.to(dev, dtype) if t.is_floating_point() and t.dim() == 4 else t.to(dev)

    return DistillBatch(
        input_ids=lay["input_ids"].to(dev), attention_mask=move(lay["attention_mask"]),
        position_ids=None if lay["position_ids"] is None else lay["position_ids"].to(dev),
        plain_input_ids=lay["plain_input_ids"].to(dev), plain_attention_mask=lay["plain_attention_mask"].to(dev),
        lengths=torch.tensor([e.student.length for e in examples], device=dev),
        images=move_images(lay["images"], dev, dtype), labels=lay["labels"].to(dev),
        **{k: (tuple(x.to(dev) for x in v) if isinstance(v, tuple) else v.to(dev)) for k, v in parts.items()},
        num_samples=len(examples), num_tokens=sum(e.student.length for e in examples),
        max_input_id=int(lay["input_ids"].max()), sample_ids=tuple(e.student.sample_id for e in examples),
        term_counts=counts,
    )


def to_device(batch: DistillBatch, device: torch.device | str) -> DistillBatch:
    """`batch` with every tensor on `device` (the same object when they already are)."""
    dev = torch.device(device)
    if batch.input_ids.device == dev:
        return batch

    def move(v: object) -> object:
        if isinstance(v, torch.Tensor):
            return v.to(dev)
        if isinstance(v, tuple):  # per-sample tensors (probe positions) or strings (sample ids)
            return tuple(x.to(dev) if isinstance(x, torch.Tensor) else x for x in v)
        if isinstance(v, dict):  # the model's image inputs (tensors); the term counts (floats) stay
            return {k: x.to(dev) if isinstance(x, torch.Tensor) else x for k, x in v.items()}
        return v

    return dataclasses.replace(batch, **{f.name: move(getattr(batch, f.name)) for f in dataclasses.fields(batch)})
