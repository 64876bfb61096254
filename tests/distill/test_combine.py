"""Combining the terms: gradient accumulation equals one big batch; LossConfig's recipes and overrides."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from alignti.distill.config import LossConfig
from alignti.distill.losses import combine, iva_loss, kd_loss, tpa_loss
from alignti.errors import AlignTIError
from tests.helpers.loss_refs import sft_of, teacher_topk


# ----------------------------------------------------------------- gradient accumulation
def _micro_batch(seed: int, h: int, v: int):
    g = torch.Generator().manual_seed(seed)
    b, t = 2, 3 + seed % 3  # different sizes and label counts per micro-batch
    labels = torch.randint(0, v, (b, t), generator=g)
    labels[:, : 1 + seed % 2] = -100
    n_kd, n_s, d = 2 + seed, 1 + seed % 2, 2
    m = 3 * n_s - seed % 2
    return {
        "x_sft": torch.randn(b, t, h, generator=g), "labels": labels,
        "x_kd": torch.randn(n_kd, h, generator=g), "kd": teacher_topk(torch.randn(n_kd, v, generator=g) * 2, 4),
        "x_iva": torch.randn(m, h, generator=g), "iva": teacher_topk(torch.randn(m, v, generator=g) * 2, 3),
        "w": torch.rand(m, generator=g), "sample": torch.arange(m) % n_s, "n_s": n_s,
        "x_tpa": torch.randn(n_kd * d, h, generator=g), "tpa": teacher_topk(torch.randn(n_kd * d, v, generator=g), 4),
        "cand": torch.log_softmax(torch.randn(n_kd, d + 1, generator=g), -1)[:, :d],
    }


def _terms(model, mb):
    return {
        "sft": sft_of(model(mb["x_sft"]), mb["labels"], chunk_size=4),
        "kd": kd_loss(model(mb["x_kd"]), *mb["kd"], chunk_size=3),
        "iva": iva_loss(model(mb["x_iva"]), *mb["iva"], mb["w"], mb["sample"], mb["n_s"], chunk_size=2),
        "tpa": tpa_loss(model(mb["x_tpa"]), *mb["tpa"], mb["cand"], chunk_size=3),
    }


def _concat(mbs):
    cat = lambda key: torch.cat([mb[key] for mb in mbs])  # noqa: E731
    t_max = max(mb["labels"].shape[1] for mb in mbs)  # pad to one length: padded targets are -100
    offsets = np.cumsum([0] + [mb["n_s"] for mb in mbs])
    return {
        "x_sft": torch.cat([F.pad(mb["x_sft"], (0, 0, 0, t_max - mb["x_sft"].shape[1])) for mb in mbs]),
        "labels": torch.cat([F.pad(mb["labels"], (0, t_max - mb["labels"].shape[1]), value=-100) for mb in mbs]),
        "x_kd": cat("x_kd"), "kd": tuple(torch.cat([mb["kd"][i] for mb in mbs]) for i in (0, 1)),
        "x_iva": cat("x_iva"), "iva": tuple(torch.cat([mb["iva"][i] for mb in mbs]) for i in (0, 1)),
        "w": cat("w"), "sample": torch.cat([mb["sample"] + int(o) for mb, o in zip(mbs, offsets)]),
        "n_s": int(offsets[-1]), "x_tpa": cat("x_tpa"),
        "tpa": tuple(torch.cat([mb["tpa"][i] for mb in mbs]) for i in (0, 1)), "cand": cat("cand"),
    }


def test_gradient_accumulation_equals_one_big_batch():
    h, v = 5, 10
    weights = {"sft": 1.0, "kd": 0.7, "iva": 0.5, "tpa": 2.0}
    mbs = [_micro_batch(s, h, v) for s in range(4)]
    torch.manual_seed(0)
    model = torch.nn.Linear(h, v)

    big, _ = combine(_terms(model, _concat(mbs)), weights)
    big.backward()
    big_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()

    with torch.no_grad():  # the trainer knows counts before the forward; here: a no-grad pass
        per_mb = [_terms(model, mb) for mb in mbs]
    global_counts = {n: sum(t[n][1] for t in per_mb) for n in weights}
    accumulated, naive = 0.0, 0.0
    for mb in mbs:
        total, means = combine(_terms(model, mb), weights, global_counts)
        total.backward()
        accumulated += total.item()
        naive += sum(weights[n] * combine(_terms(model, mb), {n: 1.0})[0].item() for n in weights) / len(mbs)
    assert abs(accumulated - big.item()) < 1e-5
    assert abs(naive - big.item()) > 1e-3  # averaging per-micro-batch means would be wrong
    for p, g in zip(model.parameters(), big_grads):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------- config
def test_loss_config_recipes_and_overrides():
    assert LossConfig("sft").weights() == {"sft": 1.0, "kd": 0.0, "iva": 0.0, "tpa": 0.0, "ground": 0.0}
    assert LossConfig("kd").weights() == {"sft": 1.0, "kd": 1.0, "iva": 0.0, "tpa": 0.0, "ground": 0.0}
    assert LossConfig().weights() == {"sft": 1.0, "kd": 1.0, "iva": 1.0, "tpa": 1.0, "ground": 0.0}
    cfg = LossConfig("kd", tpa_weight=0.5, divergence="jsd", jsd_beta=0.2, kd_weight=None)
    assert cfg.weights()["tpa"] == 0.5 and cfg.weights()["kd"] == 1.0
    assert cfg.divergence_kwargs() == {"divergence": "jsd", "beta": 0.2, "tail": "bucket", "chunk_size": 1024}
    for bad in ({"recipe": "nope"}, {"divergence": "kl"}, {"jsd_beta": 1.5}, {"tail": "x"},
                {"tpa_weighting": "x"}, {"iva_target": "x"}, {"sft_weight": -1.0}, {"chunk_size": 0},
                {"ground_layer": -1}, {"ground_weight": float("nan")}, {"iva_student_layer": -1}):
        with pytest.raises(AlignTIError):
            LossConfig(**bad)
    with pytest.raises(TypeError):  # not an option
        LossConfig(bogus=1)
    with pytest.raises(AlignTIError):
        LossConfig("sft", sft_weight=0.0)
    with pytest.raises(ValueError):  # an internal invariant: a weighted term the objective did not compute
        combine({"sft": (torch.tensor(1.0), torch.tensor(1.0))}, {"sft": 1.0, "kd": 1.0})
