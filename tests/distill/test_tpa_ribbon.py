"""L_tpa end to end on a 12-token vocabulary: every alternative a != y_t is a candidate (d = V - 1),
k_t = V, and the step's term equals, by brute force with separate plain forwards per candidate,

    sum_{a != y_t} p_T(a) KL(p_T(.|y_<=t, a) || p_S(.|y_<=t, a)) / sum_{a != y_t} p_T(a)

(teacher weighting; student: p_S(a | y_<=t) in place of p_T(a), from the student's own plain forward;
uniform: the plain average), averaged over steps. With an image in the batch
the image token cannot be fed as a candidate (it would be merged with image features; a plain
forward of it is undefined too), so its slot is masked and the reference sums over a not in
{y_t, image}.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import LlavaConfig, LlavaForConditionalGeneration, Qwen2Config, SiglipVisionConfig

from alignti.data.images import ImageInputs
from alignti.data.encode import IGNORE_INDEX, EncodedSample
from alignti.distill.batches import build_distill_batch
from alignti.distill.config import LossConfig
from alignti.distill.examples import DistillExample
from alignti.distill.objective import Objective
from alignti.storage.schema import SampleSignals
from tests.helpers.models import pixels

V, IMG, PAD, N_V = 12, 11, 0, 16


def tiny_vocab_model(seed: int, scale: float) -> LlavaForConditionalGeneration:
    """LLaVA with a 12-token text vocabulary (image token 11), hidden 64, 2 layers, 32 px / patch 8."""
    text = Qwen2Config(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, max_position_embeddings=256, pad_token_id=PAD, tie_word_embeddings=False)
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                image_size=32, patch_size=8)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMG, vision_feature_select_strategy="full",
                      vision_feature_layer=-1, image_seq_length=N_V, projector_hidden_act="gelu",
                      tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # peaked, position-dependent distributions
        for p in model.parameters():
            p.mul_(scale)
    model.set_attn_implementation("sdpa")
    return model


def encoded(sid: str, ids: list[int], n_labels: int, pixel_values: torch.Tensor | None) -> EncodedSample:
    x = torch.tensor(ids)
    labels = torch.full_like(x, IGNORE_INDEX)
    labels[-n_labels:] = x[-n_labels:]
    vision = (x == IMG).nonzero().flatten()
    text = np.asarray([t for i, t in enumerate(ids) if t != IMG or i == int(vision[0])] if vision.numel() else ids,
                      np.int32)
    n_v = int(vision.numel())
    images = None if pixel_values is None else ImageInputs({"pixel_values": pixel_values}, (n_v,), ((1, n_v),))
    return EncodedSample(sid, sid, "", "", text, x, labels, vision, torch.tensor([1]), images, n_v,
                         np.array([[len(ids) - n_labels, len(ids)]], np.int32), {})


def next_logprobs(model, prefixes: torch.Tensor, pixel_values) -> torch.Tensor:
    """float64 [n, V] log p(. | prefix) of n same-length prefixes [n, L], each its own plain sequence (no padding)."""
    pv = None if pixel_values is None else pixel_values.expand(prefixes.shape[0], -1, -1, -1)
    with torch.no_grad():
        return torch.log_softmax(model(input_ids=prefixes, pixel_values=pv).logits[:, -1].double(), -1)


def step_rows(model, s: EncodedSample) -> dict[int, torch.Tensor]:
    """Step t -> float64 [V, V]: row a = log p(. | y_<=t, a) by plain forwards. With an image, row IMG
    (undefined: an extra image token) is NaN and must never be used."""
    out = {}
    for t in s.resp_positions.tolist():
        alts = [a for a in range(V) if not (a == IMG and s.images is not None)]
        prefixes = torch.stack([torch.cat([s.input_ids[: t + 1], torch.tensor([a])]) for a in alts])
        rows = torch.full((V, V), float("nan"), dtype=torch.float64)
        rows[alts] = next_logprobs(model, prefixes, pixels(s))
        out[t] = rows
    return out


def teacher_signals(teacher, s: EncodedSample, rows: dict[int, torch.Tensor]) -> SampleSignals:
    """Hand-built cache entry: every step, all V - 1 alternatives, full rows (k = k_t = V)."""
    resp = s.resp_positions
    with torch.no_grad():
        lp = torch.log_softmax(teacher(input_ids=s.input_ids[None], pixel_values=pixels(s)).logits[0].float(), -1)
    top_lp, top_ids = lp[resp].sort(-1, descending=True)
    cands, cand_lps, rows_ids, rows_lps = [], [], [], []
    for t in resp.tolist():
        alts = [a for a in range(V) if a != int(s.input_ids[t + 1])]
        cands.append(alts)
        cand_lps.append(lp[t, alts])
        # the undefined image-token row gets a uniform placeholder: that slot is masked (weight 0)
        per_a = torch.nan_to_num(rows[t][alts], nan=-float(np.log(V)))
        vals, idx = per_a.sort(-1, descending=True)
        rows_ids.append(idx)
        rows_lps.append(vals.float())
    n = resp.numel()
    return SampleSignals(
        sample_id=s.sample_id, source_id=s.source_id, image_path="", image_sha256="", text_ids=s.text_ids,
        label_spans=s.label_spans, n_v=s.n_v, vision_start=s.vision_start, resp_positions=resp.numpy().astype(np.int32),
        topk_ids=top_ids.numpy().astype(np.int32), topk_logprobs=top_lp.numpy(),
        tpa_rows=np.arange(n, dtype=np.int32), tpa_cand_ids=np.asarray(cands, np.int32),
        tpa_cand_logprobs=torch.stack(cand_lps).numpy(), tpa_topk_ids=torch.stack(rows_ids).numpy().astype(np.int32),
        tpa_topk_logprobs=torch.stack(rows_lps).numpy(), saliency=np.zeros(0, np.float32),
        iva_positions=np.zeros(0, np.int32), iva_topk_ids=np.zeros((0, 4), np.int32),
        iva_topk_logprobs=np.zeros((0, 4), np.float32))


def brute_force(world: dict, names: list[str], weighting: str, batch_has_image: bool) -> tuple[float, int]:
    """Mean over steps of the candidate-weighted full KL, from the separate plain forwards."""
    total, steps = 0.0, 0
    for name in names:
        s, t_rows, s_rows = world[name]["sample"], world[name]["teacher_rows"], world[name]["student_rows"]
        for t in s.resp_positions.tolist():
            y = int(s.input_ids[t + 1])
            proposer = world["student"] if weighting == "student" else world["teacher"]
            p_t = next_logprobs(proposer, s.input_ids[None, : t + 1], pixels(s))[0].exp()
            num = den = 0.0
            for a in range(V):
                if a == y or (a == IMG and batch_has_image):
                    continue
                lt, ls = t_rows[t][a], s_rows[t][a]
                kl = float((lt.exp() * (lt - ls)).sum())
                u = 1.0 if weighting == "uniform" else float(p_t[a])
                num, den = num + u * kl, den + u
            total += num / den
            steps += 1
    return total / steps, steps


@pytest.fixture(scope="module")
def world():
    teacher, student = tiny_vocab_model(0, 3.0), tiny_vocab_model(1, 2.0)
    pv = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    out = {"teacher": teacher, "student": student}
    for s in (encoded("text", [1, 2, 5, 7, 3, 4, 9, 8, 6, 10], 5, None),
              encoded("image", [1, 2] + [IMG] * N_V + [5, 3, 4, 9, 8, 6], 4, pv)):
        t_rows = step_rows(teacher, s)
        out[s.sample_id] = {"sample": s, "teacher_rows": t_rows, "student_rows": step_rows(student, s),
                            "signals": teacher_signals(teacher, s, t_rows)}
    return out


@pytest.mark.parametrize("weighting", ["teacher", "uniform", "student"])
@pytest.mark.parametrize("with_image", [False, True])
def test_tpa_equals_chain_rule_brute_force(world, weighting, with_image):
    student = world["student"]
    names = ["text", "image"] if with_image else ["text"]
    examples = [DistillExample(world[n]["sample"], world[n]["signals"]) for n in names]
    assert examples[0].signals.tpa_cand_ids.shape == (5, V - 1) and examples[0].signals.tpa_topk_ids.shape[-1] == V
    cfg = LossConfig("alignti", sft_weight=0.0, kd_weight=0.0, iva_weight=0.0, tpa_weighting=weighting,
                     chunk_size=8)
    batch = build_distill_batch(examples, PAD, IMG, cfg, "cpu", torch.float32, vocab_size=V)
    assert batch.is_ribbon and batch.tpa_rows.numel() == batch.counts()["tpa"] * (V - 1)
    assert bool(torch.isinf(batch.tpa_cand_logprobs).any()) == with_image  # the image-token slots
    terms = Objective(student, cfg)(batch)
    assert set(terms) == {"tpa"}
    total, count = terms["tpa"]
    ref, steps = brute_force(world, names, weighting, with_image)
    assert float(count) == steps == batch.counts()["tpa"]
    assert float(total.detach()) / float(count) == pytest.approx(ref, rel=1e-5)
    total.backward()
    assert all(torch.isfinite(p.grad).all() for p in student.parameters() if p.grad is not None)
    student.zero_grad()
