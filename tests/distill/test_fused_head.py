"""The fused LM head (`head=`): the head applied per chunk inside the recomputed loss chunk.

Every row term is checked against the unfused path (`head(hidden[rows])` -> [N, V] logits, then
the same loss), in value and in gradient w.r.t. the hidden rows and the head's weight and bias,
and against the float64 brute force of `tests/helpers/loss_refs.py`. The memory test measures the peak of
live CPU bytes over forward + backward from the profiler's allocator events: the unfused
path's grows with the number of rows, the fused path's stays at one chunk's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from alignti.distill.losses import iva_loss, kd_loss, sft_kd_loss, sft_rows_loss, tpa_loss
from alignti.distill.objective import candidate_scores
from tests.helpers.loss_refs import softmax64, teacher_topk, topk_ref

DIVS = ("fkl", "rkl", "jsd")
TERMS = ("sft", "kd", "iva", "tpa")


@dataclass
class Rows:
    """One micro-batch's row terms: flat hidden source [M, H] and the N selected rows' targets."""

    flat: torch.Tensor  # [M, H]
    rows: torch.Tensor  # [N] long, into flat
    targets: torch.Tensor  # [N] next tokens (L_sft)
    ids: torch.Tensor  # [N, k] teacher top-k ids, some >= V (a padded teacher vocabulary)
    lps: torch.Tensor  # [N, k]
    saliency: torch.Tensor  # [N] (L_iva)
    sample: torch.Tensor  # [N] sample of each row, in [0, 3)
    cand: torch.Tensor  # [N / 2, 2] candidate log-probs (L_tpa, d = 2)


def make_rows(n: int, h: int, v: int, *, k: int = 5, pad: int = 4, seed: int = 0) -> Rows:
    g = torch.Generator().manual_seed(seed)
    m = n + 5
    teacher = torch.randn(n, v + pad, generator=g) * 2
    teacher[:, v:] += 2.0  # padded ids carry mass and reach the top-k
    ids, lps = teacher_topk(teacher, k)
    return Rows(
        flat=torch.randn(m, h, generator=g), rows=torch.randperm(m, generator=g)[:n],
        targets=torch.randint(0, v, (n,), generator=g), ids=ids, lps=lps,
        saliency=torch.rand(n, generator=g), sample=torch.arange(n) % 3,
        cand=torch.log_softmax(torch.randn(n // 2, 3, generator=g), -1)[:, :2])


def make_head(h: int, v: int, *, bias: bool = True, seed: int = 1) -> torch.nn.Linear:
    torch.manual_seed(seed)
    head = torch.nn.Linear(h, v, bias=bias)
    with torch.no_grad():
        head.weight.mul_(4.0)  # peaked enough that the tail bucket and the top-k both matter
    return head


def term_sum(name: str, flat: torch.Tensor, p: Rows, head, *, fused: bool, chunk: int, **div) -> torch.Tensor:
    """One term's sum, fused (hidden + head=) or as today (the head on all rows, then the loss)."""
    if fused:
        x, kw = flat, {"head": head, "row_index": p.rows}
    else:
        x, kw = head(flat.index_select(0, p.rows)), {}  # [N, V]
    if name == "sft":
        return sft_rows_loss(x, p.targets, chunk, **kw)[0]
    kw.update(chunk_size=chunk, **div)
    if name == "kd":
        return kd_loss(x, p.ids, p.lps, **kw)[0]
    if name == "iva":
        return iva_loss(x, p.ids, p.lps, p.saliency, p.sample, 3, **kw)[0]
    return tpa_loss(x, p.ids, p.lps, p.cand, **kw)[0]


def value_and_grads(fn, flat: torch.Tensor, params: list[torch.Tensor]):
    x = flat.clone().requires_grad_()
    total = fn(x)
    return total.detach(), torch.autograd.grad(total, [x, *params])


def assert_same(a, b, rtol=1e-5):
    """Values and gradients equal up to fp32 summation order (relative to each tensor's scale)."""
    (va, ga), (vb, gb) = a, b
    torch.testing.assert_close(va, vb, rtol=rtol, atol=1e-6)
    for x, y in zip(ga, gb, strict=True):
        torch.testing.assert_close(x, y, rtol=rtol, atol=rtol * float(y.abs().max()))


# ----------------------------------------------------------------- fused == unfused, fp32
CASES = [("sft", "fkl", "bucket")] + [(name, d, t) for name in TERMS[1:] for d in DIVS for t in ("bucket", "renorm")]


@pytest.mark.parametrize(("name", "divergence", "tail"), CASES)
def test_fused_equals_unfused(name, divergence, tail):
    n, h, v = 10, 6, 23
    p, head = make_rows(n, h, v), make_head(h, v)
    params = [head.weight, head.bias]
    div = {"divergence": divergence, "beta": 0.3, "tail": tail}
    ref = value_and_grads(lambda x: term_sum(name, x, p, head, fused=False, chunk=4, **div), p.flat, params)
    assert ref[0].abs() > 1e-3 and all(g.abs().max() > 0 for g in ref[1])
    for chunk in (1, 3, n, 1000):  # chunk > N included
        got = value_and_grads(lambda x: term_sum(name, x, p, head, fused=True, chunk=chunk, **div), p.flat, params)
        assert_same(got, ref)


def test_fused_matches_float64_reference():
    n, h, v = 9, 5, 17
    p, head = make_rows(n, h, v, seed=3), make_head(h, v, seed=4)
    logits64 = p.flat.double()[p.rows] @ head.weight.detach().double().T + head.bias.detach().double()
    for divergence in DIVS:
        got = term_sum("kd", p.flat, p, head, fused=True, chunk=4, divergence=divergence, beta=0.3)
        expected = topk_ref(logits64, p.ids, p.lps, divergence, beta=0.3).sum()
        assert abs(got.item() - expected) < 1e-5 * max(1.0, abs(expected))
    sft = term_sum("sft", p.flat, p, head, fused=True, chunk=2)
    l64 = logits64.numpy()
    expected = sum(-math.log(softmax64(l64[i])[p.targets[i]]) for i in range(n))
    assert abs(sft.item() - expected) < 1e-5 * expected


def test_tied_embedding_gets_both_gradients():
    # Tied weights: one tensor is the input embedding and the head; its gradient sums both uses.
    n, h, v = 8, 4, 19
    p = make_rows(n, h, v, seed=5)
    emb = torch.nn.Embedding(v, h)
    head = torch.nn.Linear(h, v, bias=False)
    head.weight = emb.weight
    tokens = torch.randint(0, v, (p.flat.shape[0],), generator=torch.Generator().manual_seed(6))

    def loss(fused: bool) -> torch.Tensor:
        flat = torch.tanh(emb(tokens) + p.flat)  # a "decoder" reading the tied embedding
        return sum(term_sum(name, flat, p, head, fused=fused, chunk=3) for name in TERMS)

    ref = loss(False)
    (ref_grad,) = torch.autograd.grad(ref, [emb.weight])
    got = loss(True)
    (got_grad,) = torch.autograd.grad(got, [emb.weight])
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_grad, ref_grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", TERMS)
def test_no_rows_gives_zero_gradients_for_hidden_and_head(name):
    h, v = 4, 11
    p, head = make_rows(0, h, v), make_head(h, v)
    flat = p.flat.clone().requires_grad_()
    total = term_sum(name, flat, p, head, fused=True, chunk=4)
    total.backward()
    assert total.item() == 0 and total.dtype == torch.float32
    # The unfused path's head(rows[:0]) leaves zeros, not None (DDP needs every gradient).
    for g in (flat.grad, head.weight.grad, head.bias.grad):
        assert g is not None and not g.isnan().any() and g.abs().max() == 0


# ----------------------------------------------------------------- one pass for L_sft + L_kd
def test_sft_kd_loss_equals_the_two_terms_with_one_head_pass():
    n, h, v, chunk = 11, 6, 23, 4
    p, head = make_rows(n, h, v, seed=7), make_head(h, v, seed=8)
    calls = []

    def counted(rows: torch.Tensor) -> torch.Tensor:
        calls.append(rows.shape[0])
        return head(rows)

    params = [head.weight, head.bias]
    div = {"divergence": "jsd", "beta": 0.4, "tail": "bucket"}
    ref = value_and_grads(lambda x: term_sum("sft", x, p, head, fused=True, chunk=chunk)
                          + 0.5 * term_sum("kd", x, p, head, fused=True, chunk=chunk, **div), p.flat, params)
    x = p.flat.clone().requires_grad_()
    (s, s_count), (k, k_count) = sft_kd_loss(x, p.targets, p.ids, p.lps, row_index=p.rows, head=counted,
                                             chunk_size=chunk, **div)
    assert sum(calls) == n and len(calls) == math.ceil(n / chunk)  # one head pass for both terms
    got = (s + 0.5 * k).detach(), torch.autograd.grad(s + 0.5 * k, [x, *params])
    assert sum(calls) == 2 * n  # ... and one recomputation of it in backward, inside the chunk
    assert_same(got, ref)
    assert s_count.item() == k_count.item() == n
    unfused = sft_kd_loss(head(p.flat[p.rows]), p.targets, p.ids, p.lps, chunk_size=chunk, **div)
    torch.testing.assert_close(torch.stack([unfused[0][0], unfused[1][0]]), torch.stack([s, k]).detach())
    (s0, c0), (k0, _) = sft_kd_loss(p.flat, p.targets[:0], p.ids[:0], p.lps[:0], row_index=p.rows[:0], head=head)
    assert s0.item() == k0.item() == c0.item() == 0
    with pytest.raises(ValueError, match="targets"):
        sft_kd_loss(p.flat, p.targets[:-1], p.ids, p.lps, row_index=p.rows, head=head)


# ----------------------------------------------------------------- bf16
def test_bf16_autocast_head_in_bf16_loss_in_fp32():
    n, h, v = 12, 8, 29
    p, head = make_rows(n, h, v, seed=9), make_head(h, v, seed=10)
    seen = []
    hook = head.register_forward_hook(lambda mod, args, out: seen.append(out.dtype))
    params = [head.weight, head.bias]
    for name in TERMS:
        results = []
        for fused in (False, True):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                results.append(value_and_grads(
                    lambda x: term_sum(name, x, p, head, fused=fused, chunk=5), p.flat, params))
        (ref, ref_g), (got, got_g) = results
        assert got.dtype == torch.float32 and got_g[1].dtype == torch.float32
        torch.testing.assert_close(got, ref, rtol=1e-3, atol=1e-3)
        for a, b in zip(got_g, ref_g, strict=True):  # per-chunk bf16 matmuls: bf16 tolerance
            torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2 * float(b.abs().max()))
    hook.remove()
    assert seen and set(seen) == {torch.bfloat16}


def test_bf16_weights_and_hidden():
    n, h, v = 10, 8, 29
    p, head = make_rows(n, h, v, seed=11), make_head(h, v, seed=12).bfloat16()
    flat = p.flat.bfloat16()
    ref = value_and_grads(lambda x: term_sum("kd", x, p, head, fused=False, chunk=3), flat, [head.weight])
    got = value_and_grads(lambda x: term_sum("kd", x, p, head, fused=True, chunk=3), flat, [head.weight])
    assert got[0].dtype == torch.float32 and got[1][0].dtype == got[1][1].dtype == torch.bfloat16
    logits = head(flat[p.rows]).float()  # the bf16 head's logits; the loss in float64 from them
    expected = topk_ref(logits, p.ids, p.lps, "fkl").sum()
    assert abs(got[0].item() - expected) < 1e-5 * max(1.0, abs(expected))
    torch.testing.assert_close(got[0], ref[0])
    for a, b in zip(got[1], ref[1], strict=True):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2 * float(b.float().abs().max()))


def test_candidate_scores_are_the_heads_logits_in_fp32_under_autocast():
    """The student weighting's scores: the full head's logits at the step rows, at the candidate
    columns only, fp32 and detached even under bf16 autocast."""
    h, v = 8, 29
    head = make_head(h, v, seed=13)
    hidden = torch.randn(7, h, generator=torch.Generator().manual_seed(14), requires_grad=True)
    rows, cands = torch.tensor([1, 4, 6]), torch.tensor([[3, 0], [28, 5], [7, 7]])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = candidate_scores(head, hidden, rows, cands)
    full = head(hidden.detach().double()[rows].to(head.weight.dtype)).double()  # [3, V] fp32 head
    ref = full.gather(1, cands)
    assert z.dtype == torch.float32 and not z.requires_grad
    torch.testing.assert_close(z.double(), ref, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------- memory
def peak_bytes(fn) -> int:
    """Peak live CPU bytes allocated (above the start) while fn() runs, from the allocator's
    events as the profiler records them (every alloc and free, in order)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    assert events, "the profiler recorded no allocator events"
    live = np.cumsum([e.nbytes() for e in sorted(events, key=lambda e: e.start_ns())])
    return int(live.max())


@pytest.mark.parametrize("name", TERMS)
def test_fused_peak_memory_does_not_grow_with_rows(name):
    h, v, chunk = 8, 4096, 16
    one_chunk = chunk * v * 4  # bytes of one chunk's fp32 logits
    head = make_head(h, v)
    # From two chunks on: the head's per-chunk weight gradients then meet in one [V, H] buffer.
    sizes = (2 * chunk, 8 * chunk)
    peaks = {}
    for fused in (False, True):
        for n in sizes:
            p = make_rows(n, h, v, seed=n)
            flat = p.flat.clone().requires_grad_()

            def step():
                term_sum(name, flat, p, head, fused=fused, chunk=chunk).backward()
            step()  # warm-up: the head's .grad allocated, lazy initialisation done
            flat.grad = None
            peaks[fused, n] = peak_bytes(step)
    rows_added = sizes[1] - sizes[0]
    unfused_growth = peaks[False, sizes[1]] - peaks[False, sizes[0]]
    fused_growth = peaks[True, sizes[1]] - peaks[True, sizes[0]]
    # Unfused: the [N, V] logits and their gradient grow with N (so this test can fail).
    assert unfused_growth >= 1.5 * rows_added * v * 4, peaks
    # Fused: only [N, H]- and [N, k]-sized tensors grow (a few % of one chunk here).
    assert fused_growth <= 0.1 * one_chunk, peaks
    assert peaks[True, sizes[1]] < 0.5 * peaks[False, sizes[1]], peaks
