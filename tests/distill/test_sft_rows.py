"""sft_rows_loss (the distill step's L_sft on gathered rows) against float64 references."""

import pytest
import torch

from alignti.data.encode import IGNORE_INDEX
from alignti.distill.losses import sft_rows_loss


def test_matches_float64_reference_gathered_or_indexed():
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(2, 7, 11, generator=g) * 3).requires_grad_()
    labels = torch.randint(0, 11, (2, 7), generator=g)
    labels[0, :3] = IGNORE_INDEX
    labels[1, 5] = IGNORE_INDEX
    rows = (labels[:, 1:] != IGNORE_INDEX).nonzero()  # (b, t) whose next token is labelled
    picked = logits[rows[:, 0], rows[:, 1]]
    targets = labels[rows[:, 0], rows[:, 1] + 1]
    total, count = sft_rows_loss(picked, targets, chunk_size=3)
    ref = -torch.log_softmax(picked.detach().double(), -1).gather(1, targets[:, None]).sum()
    assert float(count) == rows.shape[0] == 9
    assert float(total.detach()) == pytest.approx(float(ref), rel=1e-6)
    flat = (rows[:, 0] * logits.shape[1] + rows[:, 1])  # the same rows, gathered chunk by chunk
    idx_total, idx_count = sft_rows_loss(logits.reshape(-1, 11), targets, chunk_size=4, row_index=flat)
    assert float(idx_count) == float(count) and float(idx_total.detach()) == pytest.approx(float(total.detach()),
                                                                                          rel=1e-6)
    (grad,) = torch.autograd.grad(total, logits)
    ref_logits = logits.detach().double().requires_grad_()
    ref_rows = ref_logits[rows[:, 0], rows[:, 1]]
    (-torch.log_softmax(ref_rows, -1).gather(1, targets[:, None]).sum()).backward()
    assert torch.allclose(grad.double(), ref_logits.grad, atol=1e-6)


def test_bf16_rows_are_computed_in_fp32():
    g = torch.Generator().manual_seed(1)
    rows = torch.randn(5, 13, generator=g) * 4
    targets = torch.randint(0, 13, (5,), generator=g)
    total, _ = sft_rows_loss(rows.bfloat16(), targets)
    ref = -torch.log_softmax(rows.bfloat16().double(), -1).gather(1, targets[:, None]).sum()
    assert total.dtype == torch.float32 and float(total) == pytest.approx(float(ref), rel=1e-5)


def test_empty_rows_give_zero_and_no_nan():
    logits = torch.randn(3, 9, requires_grad=True)
    total, count = sft_rows_loss(logits[:0], torch.zeros(0, dtype=torch.long))
    assert float(total) == 0.0 and float(count) == 0.0
    total.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_shape_mismatch_is_refused():
    with pytest.raises(ValueError, match="disagree"):
        sft_rows_loss(torch.zeros(3, 5), torch.zeros(2, dtype=torch.long))
