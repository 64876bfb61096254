"""L_tpa against the chain-rule term on a tiny vocabulary in float64, for every weighting."""

from __future__ import annotations

import math

import pytest
import torch

from alignti.distill.kl import topk_kl_rows
from alignti.distill.losses import tpa_loss
from tests.helpers.loss_refs import div64, rand, softmax64, teacher_topk, topk_ref


@pytest.mark.parametrize("weighting", ("teacher", "uniform", "student"))
def test_tpa_equals_chain_rule_term_on_tiny_vocab(weighting):
    v, steps = 8, 3
    d = v - 1
    gen = torch.Generator().manual_seed(4)
    rows, t_ids, t_lps, cand_lps, s_scores, expected = [], [], [], [], [], 0.0
    for step in range(steps):
        step_logits = torch.randn(v, generator=gen) * 2
        p_step = softmax64(step_logits.numpy())
        student_step = torch.randn(v, generator=gen) * 2  # the student's logits at the ground-truth row
        q_step = softmax64(student_step.numpy())
        y = step
        cands = [a for a in torch.randperm(v, generator=gen).tolist() if a != y]  # all a != y_t
        teacher_after = torch.randn(v, v, generator=gen) * 2  # p_T(. | y_<t, a), one row per a
        student_after = torch.randn(v, v, generator=gen) * 2  # p_S(. | y_<t, a)
        kl = {a: div64(list(softmax64(teacher_after[a].numpy())), list(softmax64(student_after[a].numpy())), "fkl")
              for a in cands}
        if weighting == "teacher":
            expected += sum(p_step[a] * kl[a] for a in cands) / sum(p_step[a] for a in cands)
        elif weighting == "student":
            expected += sum(q_step[a] * kl[a] for a in cands) / sum(q_step[a] for a in cands)
        else:
            expected += sum(kl.values()) / d
        for a in cands:
            ids, lps = teacher_topk(teacher_after[a][None], v)  # k_t = V
            rows.append(student_after[a])
            t_ids.append(ids[0])
            t_lps.append(lps[0])
        cand_lps.append(torch.log(torch.tensor([p_step[a] for a in cands], dtype=torch.float64)).float())
        s_scores.append(student_step[cands])  # logits, not log-probs: the renormalisation cancels the difference
    scores = torch.stack(s_scores) if weighting == "student" else None
    total, count = tpa_loss(torch.stack(rows), torch.stack(t_ids), torch.stack(t_lps), torch.stack(cand_lps),
                            weighting=weighting, student_scores=scores, chunk_size=5)
    assert count.item() == steps
    assert abs(total.item() - expected) < 1e-5


def test_tpa_student_weights_are_constants():
    """u comes from the student's scores but carries no gradient into them; shifting the scores of a
    step by a constant (logits vs log-probs) changes nothing."""
    v, n, d = 6, 3, 2
    student = rand(n * d, v, seed=30).requires_grad_()
    ids, lps = teacher_topk(rand(n * d, v, seed=31), 3)
    cand = torch.log_softmax(rand(n, d + 1, seed=32), -1)[:, :d]
    scores = rand(n, d, seed=33).requires_grad_()
    total, _ = tpa_loss(student, ids, lps, cand, weighting="student", student_scores=scores)
    total.backward()
    assert scores.grad is None and student.grad is not None
    shifted, _ = tpa_loss(student, ids, lps, cand, weighting="student", student_scores=scores + rand(n, 1, seed=34))
    torch.testing.assert_close(shifted, total)
    u = torch.softmax(scores.detach().double(), -1)
    ref = sum(float(u[t, j]) * float(topk_ref(student[t * d + j][None], ids[t * d + j][None], lps[t * d + j][None],
                                              "fkl")[0]) for t in range(n) for j in range(d))
    assert abs(total.item() - ref) < 1e-5
    with pytest.raises(ValueError, match="needs student_scores"):
        tpa_loss(student, ids, lps, cand, weighting="student")
    with pytest.raises(ValueError, match="needs student_scores"):
        tpa_loss(student, ids, lps, cand, student_scores=scores)


@pytest.mark.parametrize("weighting", ("teacher", "student"))
def test_tpa_padded_candidate_slots_have_zero_weight(weighting):
    v = 6
    student = rand(4, v, seed=23)
    ids, lps = teacher_topk(rand(4, v, seed=24), 3)
    cand = torch.tensor([[math.log(0.2), float("-inf")], [float("-inf"), float("-inf")]])
    scores = torch.tensor([[0.0, 50.0], [1.0, 2.0]]) if weighting == "student" else None  # the padded slot scores high
    total, count = tpa_loss(student, ids, lps, cand, weighting=weighting, student_scores=scores)
    assert count.item() == 1
    torch.testing.assert_close(total, topk_kl_rows(student[:1], ids[:1], lps[:1]).sum())
