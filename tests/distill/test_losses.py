"""KD, SFT and IVA loss tests against float64 brute-force references (`tests/helpers/loss_refs.py`:
explicit loops in numpy float64, no code path shared with `alignti.distill.kl`). TPA:
test_tpa_loss.py; combining terms and LossConfig: test_combine.py.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from alignti.distill.kl import PADDED_MASS_WARN, chunked_topk_kl, padded_teacher_mass, topk_kl_rows
from alignti.distill.losses import combine, iva_attention_loss, iva_loss, kd_loss, tpa_loss
from tests.helpers.loss_refs import DIVS, div64, full_ref, rand, sft_of, softmax64, teacher_topk, topk_ref


# ----------------------------------------------------------------- top-k KL
@pytest.mark.parametrize("divergence", DIVS)
def test_k_equals_v_gives_full_divergence(divergence):
    n, v = 6, 11
    student, teacher = rand(n, v, seed=1), rand(n, v, seed=2)
    ids = torch.stack([torch.randperm(v, generator=torch.Generator().manual_seed(r)) for r in range(n)])
    logprobs = torch.log_softmax(teacher.double(), -1).gather(1, ids).float()
    x = student.clone().requires_grad_()
    rows = topk_kl_rows(x, ids, logprobs, divergence=divergence, beta=0.3)
    np.testing.assert_allclose(rows.detach().double().numpy(), full_ref(student, teacher, divergence, beta=0.3),
                               rtol=1e-5, atol=1e-6)
    rows.sum().backward()  # the empty tail bucket must not leak NaN into the gradient
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("divergence", DIVS)
@pytest.mark.parametrize("tail", ("bucket", "renorm"))
@pytest.mark.parametrize("k", (1, 4, 12))
def test_topk_matches_bucket_reference(divergence, tail, k):
    n, v = 7, 13
    student, teacher = rand(n, v, seed=3), rand(n, v, seed=4)
    ids, logprobs = teacher_topk(teacher, k)
    got = topk_kl_rows(student, ids, logprobs, divergence=divergence, beta=0.3, tail=tail).double().numpy()
    np.testing.assert_allclose(got, topk_ref(student, ids, logprobs, divergence, tail, beta=0.3), rtol=1e-5, atol=1e-6)
    if tail == "bucket":  # merging buckets never increases an f-divergence
        full = full_ref(student, teacher, divergence, beta=0.3)  # teacher log-probs were fp32-rounded
        assert (got <= full + 1e-5 * (1 + full)).all()


@pytest.mark.parametrize("divergence", DIVS)
@pytest.mark.parametrize("tail", ("bucket", "renorm"))
def test_identical_teacher_and_student_give_zero(divergence, tail):
    logits = rand(5, 20, seed=5).requires_grad_()
    ids, logprobs = teacher_topk(logits.detach(), 6)
    rows = topk_kl_rows(logits, ids, logprobs, divergence=divergence, tail=tail)
    assert rows.abs().max() < 1e-6
    rows.sum().backward()  # a minimum: the gradient vanishes too
    assert logits.grad.abs().max() < 1e-5


def bucket_div_torch64(student: torch.Tensor, ids: torch.Tensor, logprobs: torch.Tensor, divergence: str,
                       beta: float = 0.5) -> torch.Tensor:
    """Per-row bucket divergence in float64 torch (differentiable): q by softmax, the tail by summing
    the probabilities of an explicit list of the other ids, buckets built row by row."""
    q_all = torch.softmax(student, -1)
    v = student.shape[1]
    rows = []
    for n in range(student.shape[0]):
        head = [(int(i), float(lp)) for i, lp in zip(ids[n], logprobs[n].double()) if 0 <= int(i) < v]
        p = [math.exp(lp) for _, lp in head]
        q = [q_all[n, i] for i, _ in head]
        rest = [j for j in range(v) if j not in {i for i, _ in head}]
        if rest:
            p.append(max(0.0, 1.0 - sum(p)))
            q.append(q_all[n, rest].sum())
        p_t, q_t = torch.tensor(p, dtype=torch.float64), torch.stack(q)
        if divergence == "rkl":
            rows.append((q_t * (q_t.log() - p_t.clamp_min(1e-10).log())).sum())
            continue
        lp_t = torch.where(p_t > 0, p_t, 1.0).log()
        if divergence == "fkl":
            rows.append((p_t * (lp_t - q_t.log())).sum())
            continue
        m = beta * p_t + (1 - beta) * q_t
        rows.append(beta * (p_t * (lp_t - m.log())).sum() + (1 - beta) * (q_t * (q_t.log() - m.log())).sum())
    return torch.stack(rows)


@pytest.mark.parametrize("divergence", DIVS)
def test_bucket_gradient_matches_float64_reference(divergence):
    # Padded and negative ids, a repeated id (its bucket counts twice), a row whose ids cover the
    # whole vocabulary (no tail) and a student so confident that the tail is ~1e-26 of the mass: the
    # hand-written backward must match autograd through an independent float64 reference in all.
    n, v, k = 6, 9, 4
    student, teacher = rand(n, v, seed=20), rand(n, v + 3, seed=21)
    teacher[:, v:] += 2.0  # padded ids reach the top-k
    ids, logprobs = teacher_topk(teacher, k)
    ids[1, 0] = -1
    ids[4, :2] = 2
    student[2, int(ids[2, 0]) if ids[2, 0] < v else 0] += 60.0
    ids = torch.cat([ids, torch.full((n, v - k), -1)], 1)  # room for a full-vocabulary row
    logprobs = torch.cat([logprobs, torch.full((n, v - k), -30.0)], 1)
    ids[3] = torch.randperm(v, generator=torch.Generator().manual_seed(3))
    logprobs[3] = torch.log_softmax(teacher[3, :v].double(), -1)[ids[3]].float()
    weights = rand(n, seed=22)
    x, ref_x = student.clone().requires_grad_(), student.double().requires_grad_()
    got = topk_kl_rows(x, ids, logprobs, divergence=divergence, beta=0.3)
    ref = bucket_div_torch64(ref_x, ids, logprobs, divergence, beta=0.3)
    torch.testing.assert_close(got.double(), ref.detach(), rtol=1e-5, atol=1e-6)
    (got * weights).sum().backward()
    (ref * weights.double()).sum().backward()
    torch.testing.assert_close(x.grad.double(), ref_x.grad, rtol=1e-4, atol=1e-6)


def test_tail_mass_is_exact_not_one_minus_head():
    # The student puts ~all mass on the head: 1 - sum q would cancel to 0 in fp32.
    student = torch.tensor([[30.0, 0.0, 0.0, 0.0, 0.0]])
    teacher = torch.tensor([[3.0, 0.0, 0.0, 0.0, 0.0]])
    ids, logprobs = teacher_topk(teacher, 1)
    got = topk_kl_rows(student, ids, logprobs).double().numpy()
    np.testing.assert_allclose(got, topk_ref(student, ids, logprobs, "fkl"), rtol=1e-5)


@pytest.mark.parametrize("tail", ("bucket", "renorm"))
@pytest.mark.parametrize("divergence", DIVS)
def test_padded_vocab_ids_move_to_tail(divergence, tail):
    n, v, pad = 5, 10, 4
    teacher = rand(n, v + pad, seed=6)
    teacher[:, v:] += 3.0  # padded ids carry real mass and reach the top-k
    student = rand(n, v, seed=7)
    ids, logprobs = teacher_topk(teacher, 6)
    assert (ids >= v).any() and (ids < v).any()
    got = topk_kl_rows(student, ids, logprobs, divergence=divergence, beta=0.4, tail=tail).double().numpy()
    np.testing.assert_allclose(got, topk_ref(student, ids, logprobs, divergence, tail, beta=0.4), rtol=1e-5, atol=1e-6)
    mass = padded_teacher_mass(ids, logprobs, v).double().numpy()
    lp64 = logprobs.double().numpy()
    expected = [sum(math.exp(lp64[r, j]) for j in range(ids.shape[1]) if ids[r, j] >= v) for r in range(n)]
    np.testing.assert_allclose(mass, expected, rtol=1e-6)
    assert mass.max() > PADDED_MASS_WARN


def test_rows_with_only_padded_ids_are_zero_and_nan_free():
    student = rand(3, 8, seed=8).requires_grad_()
    ids = torch.full((3, 2), 9)
    logprobs = torch.log(torch.tensor([[0.5, 0.3]] * 3))
    for divergence in DIVS:
        for tail in ("bucket", "renorm"):
            rows = topk_kl_rows(student, ids, logprobs, divergence=divergence, tail=tail)
            rows.sum().backward()
            assert rows.abs().max() < 1e-6 and not student.grad.isnan().any()


def test_rkl_with_empty_teacher_tail_is_finite():
    # Teacher head sums to 1 (tail r = 0) but the student has tail mass: KL(q || p) would be inf.
    student = rand(2, 6, seed=9).requires_grad_()
    ids = torch.tensor([[0, 1], [2, 3]])
    logprobs = torch.log(torch.tensor([[0.6, 0.4], [0.7, 0.3]]))
    rows = topk_kl_rows(student, ids, logprobs, divergence="rkl")
    rows.sum().backward()
    assert torch.isfinite(rows).all() and torch.isfinite(student.grad).all() and (rows > 0).all()


def test_jsd_limits_symmetry_and_bound():
    n, v = 8, 9
    student, teacher = rand(n, v, scale=4.0, seed=10), rand(n, v, scale=4.0, seed=11)
    all_ids = torch.arange(v).expand(n, v)
    lp_t = torch.log_softmax(teacher.double(), -1).float()
    lp_s = torch.log_softmax(student.double(), -1).float()
    for beta in (0.0, 1.0):  # mixture equals one side, whose weight is 0
        assert topk_kl_rows(student, all_ids, lp_t, divergence="jsd", beta=beta).abs().max() == 0
    ab = topk_kl_rows(student, all_ids, lp_t, divergence="jsd", beta=0.5)
    ba = topk_kl_rows(teacher, all_ids, lp_s, divergence="jsd", beta=0.5)
    torch.testing.assert_close(ab, ba, rtol=1e-5, atol=1e-6)
    for beta in (1e-3, 0.2, 0.5, 0.9):
        rows = topk_kl_rows(student, all_ids, lp_t, divergence="jsd", beta=beta)
        bound = -beta * math.log(beta) - (1 - beta) * math.log(1 - beta)  # binary entropy
        assert (rows >= -1e-7).all() and (rows <= bound + 1e-6).all()
    # Nearly disjoint distributions approach the bound log 2.
    far = torch.tensor([[40.0, 0.0]])
    lp_far = torch.log_softmax(torch.tensor([[0.0, 40.0]], dtype=torch.float64), -1).float()
    assert abs(topk_kl_rows(far, torch.tensor([[0, 1]]), lp_far, divergence="jsd").item() - math.log(2)) < 1e-5


# ----------------------------------------------------------------- chunking, masking, dtypes
@pytest.mark.parametrize("divergence", DIVS)
def test_chunked_equals_unchunked(divergence):
    n, v, k = 23, 17, 5
    base, teacher = rand(n + 4, v, seed=12), rand(n, v, seed=13)
    ids, logprobs = teacher_topk(teacher, k)
    weights = torch.rand(n, generator=torch.Generator().manual_seed(0))
    index = torch.randperm(n + 4, generator=torch.Generator().manual_seed(1))[:n]

    ref_in = base.clone().requires_grad_()
    ref = (topk_kl_rows(ref_in[index], ids, logprobs, divergence=divergence) * weights).sum()
    ref.backward()
    for chunk in (1, 4, 1000):
        x = base.clone().requires_grad_()
        total, count = chunked_topk_kl(x, ids, logprobs, weights=weights, row_index=index, chunk_size=chunk,
                                       divergence=divergence)
        total.backward()
        torch.testing.assert_close(total, ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(x.grad, ref_in.grad, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(count, weights.sum())
    plain, count = chunked_topk_kl(base[index], ids, logprobs, chunk_size=4, divergence=divergence)
    torch.testing.assert_close(plain, topk_kl_rows(base[index], ids, logprobs, divergence=divergence).sum())
    assert count.item() == n


def _saved_fp32_numel(fn) -> int:
    """Largest fp32 tensor autograd keeps for backward while running fn()."""
    sizes = [0]

    def pack(t):
        if t.dtype == torch.float32:
            sizes.append(t.numel())
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return max(sizes)


def test_chunks_keep_no_full_fp32_copy():
    n, v, chunk = 64, 50, 8
    logits = rand(n, v, seed=14).bfloat16().requires_grad_()
    ids, logprobs = teacher_topk(rand(n, v, seed=15), 4)
    chunked = _saved_fp32_numel(lambda: chunked_topk_kl(logits, ids, logprobs, chunk_size=chunk))
    assert chunked <= n * ids.shape[1]  # only the [N, k] teacher log-probs, no [*, V] fp32
    whole = _saved_fp32_numel(lambda: topk_kl_rows(logits, ids, logprobs))
    assert whole >= n * v  # the unchunked path does keep one: the check can fail


def test_sft_matches_reference_chunked_and_unchunked():
    b, t, v = 3, 7, 11
    logits = rand(b, t, v, seed=16)
    labels = torch.randint(0, v, (b, t), generator=torch.Generator().manual_seed(2))
    labels[0, :4] = -100
    labels[2, 2] = -100
    x64, lab = logits.double().numpy(), labels.numpy()
    pairs = [(i, j) for i in range(b) for j in range(t - 1) if lab[i, j + 1] != -100]
    expected = sum(-math.log(softmax64(x64[i, j])[lab[i, j + 1]]) for i, j in pairs)
    ref_in = logits.clone().requires_grad_()
    F.cross_entropy(ref_in[:, :-1].reshape(-1, v), labels[:, 1:].reshape(-1), reduction="sum").backward()
    for chunk in (1, 3, 1024):
        x = logits.clone().requires_grad_()
        total, count = sft_of(x, labels, chunk_size=chunk)
        total.backward()
        assert count.item() == len(pairs)
        assert abs(total.item() - expected) < 1e-4
        torch.testing.assert_close(x.grad, ref_in.grad, rtol=1e-5, atol=1e-7)


def test_all_masked_gives_zero_and_no_nan():
    v = 9
    logits = rand(2, 5, v, seed=17).requires_grad_()
    rows = rand(4, v, seed=18).requires_grad_()
    empty_ids, empty_lp = torch.zeros((0, 3), dtype=torch.long), torch.zeros((0, 3))
    terms = {
        "sft": sft_of(logits, torch.full((2, 5), -100)),
        "kd": kd_loss(rows[:0], empty_ids, empty_lp),
        "iva": iva_loss(rows[:0], empty_ids, empty_lp, torch.zeros(0), torch.zeros(0, dtype=torch.long), 3),
        "tpa": tpa_loss(rows[:0], empty_ids, empty_lp, torch.zeros((0, 2))),
        "kd_indexed": kd_loss(rows, empty_ids, empty_lp, row_index=torch.zeros(0, dtype=torch.long)),
    }
    for name, (s, c) in terms.items():
        assert s.item() == 0 and c.item() == 0, name
    total, means = combine(terms, {"sft": 1.0, "kd": 1.0, "iva": 0.5, "tpa": 2.0, "kd_indexed": 1.0})
    total.backward()
    assert total.item() == 0 and all(m.item() == 0 for m in means.values())
    for g in (logits.grad, rows.grad):
        assert g is not None and not g.isnan().any() and g.abs().max() == 0


def test_bf16_inputs_are_computed_in_fp32():
    n, v = 9, 14
    student = rand(n, v, seed=19).bfloat16()
    ids, logprobs = teacher_topk(rand(n, v, seed=20), 5)
    for divergence in DIVS:
        x = student.clone().requires_grad_()
        total, _ = chunked_topk_kl(x, ids, logprobs.bfloat16(), chunk_size=4, divergence=divergence)
        total.backward()
        assert total.dtype == torch.float32 and x.grad.dtype == torch.bfloat16
        ref = topk_ref(student.float(), ids, logprobs.bfloat16().float(), divergence).sum()
        assert abs(total.item() - ref) < 1e-5 * max(1.0, abs(ref))
    labels = torch.randint(0, v, (1, n), generator=torch.Generator().manual_seed(3))
    s, c = sft_of(student[None], labels)
    torch.testing.assert_close(s, F.cross_entropy(student[:-1].float(), labels[0, 1:], reduction="sum"))


# ----------------------------------------------------------------- IVA
def test_iva_loss_matches_reference():
    v, k = 12, 4
    sample_index = torch.tensor([0, 0, 0, 2, 2, 3])  # sample 1 has no rows; sample 3 has zero weight
    w = torch.tensor([0.3, 0.1, 0.2, 0.05, 0.15, 0.0])
    student = rand(6, v, seed=21).requires_grad_()
    ids, logprobs = teacher_topk(rand(6, v, seed=22), k)
    total, count = iva_loss(student, ids, logprobs, w, sample_index, 4, chunk_size=2)
    kl = topk_ref(student, ids, logprobs, "fkl")
    expected = sum(kl[i] * w[i].item() / 0.6 for i in range(3)) + sum(kl[i] * w[i].item() / 0.2 for i in (3, 4))
    expected += kl[5]  # a zero-weight sample falls back to uniform weights over its rows
    assert count.item() == 3
    assert abs(total.item() - expected) < 1e-5


def test_iva_attention_loss_matches_reference():
    sal = torch.tensor([[0.5, 0.25, 0.25, 0.0], [0.1, 0.2, 0.3, 0.4]])
    att = torch.tensor([[0.4, 0.4, 0.1, 0.1], [0.25, 0.25, 0.25, 0.25]], requires_grad=True)
    total, count = iva_attention_loss(sal, att)
    expected = sum(div64(list(sal[i].double().numpy()), list(att[i].detach().double().numpy()), "fkl") for i in range(2))
    assert count.item() == 2 and abs(total.item() - expected) < 1e-6
    total.backward()
    assert torch.isfinite(att.grad).all()
