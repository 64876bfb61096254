import torch

from alignti.extract.signals import (
    choose_tpa_steps, gather_logprobs, propose_sample, propose_top, sample_seed, topk_logprobs,
)


def _head(h=16, v=50, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Linear(h, v, bias=False)


def test_topk_matches_full_log_softmax_chunked():
    head = _head()
    hidden = torch.randn(37, 16)
    ids, lps = topk_logprobs(hidden, head, k=8, chunk_size=5)
    ref = torch.log_softmax(head(hidden).double(), -1)
    rv, ri = ref.topk(8, -1)
    assert torch.equal(ids, ri)
    assert torch.allclose(lps.double(), rv, atol=1e-5)
    assert torch.all(lps[:, :-1] >= lps[:, 1:])


def test_gather_logprobs():
    head = _head()
    hidden = torch.randn(9, 16)
    ids = torch.randint(0, 50, (9, 3))
    ref = torch.log_softmax(head(hidden).double(), -1).gather(1, ids)
    assert torch.allclose(gather_logprobs(hidden, head, ids, chunk_size=4).double(), ref, atol=1e-5)


def test_propose_top_excludes_target():
    topk = torch.tensor([[5, 3, 9, 1, 7], [2, 4, 6, 8, 0]])
    targets = torch.tensor([3, 11])
    out = propose_top(topk, targets, d=3)
    assert out.tolist() == [[5, 9, 1], [2, 4, 6]]
    assert propose_top(topk, targets, d=3, exclude=9).tolist() == [[5, 1, 7], [2, 4, 6]]


def test_propose_sample_seeded_distinct_and_excludes_target():
    head = _head(v=20)
    hidden = torch.randn(6, 16)
    targets = torch.arange(6)
    s = sample_seed(0, "abc")
    a = propose_sample(hidden, head, targets, d=4, seed=s)
    b = propose_sample(hidden, head, targets, d=4, seed=s)
    c = propose_sample(hidden, head, targets, d=4, seed=sample_seed(0, "abd"))
    assert torch.equal(a, b) and not torch.equal(a, c)
    for row, t in zip(a.tolist(), targets.tolist()):
        assert len(set(row)) == 4 and t not in row
    ex = propose_sample(hidden, head, targets, d=4, seed=s, exclude=7)
    assert 7 not in ex.flatten().tolist()


def test_propose_sample_follows_teacher_distribution():
    # One row, V=3 with p = (0.7, 0.2, 0.1), target 0: the first draw is 1 with prob 2/3.
    head = torch.nn.Linear(1, 3, bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.copy_(torch.log(torch.tensor([0.7, 0.2, 0.1])))
    firsts = [int(propose_sample(torch.zeros(1, 1), head, torch.tensor([0]), 1, seed=i)[0, 0]) for i in range(600)]
    share = firsts.count(1) / len(firsts)
    assert abs(share - 2 / 3) < 0.07


def test_choose_tpa_steps():
    lp = torch.log(torch.tensor([0.9, 0.2, 0.5, 0.1]))
    assert choose_tpa_steps(lp, None).tolist() == [0, 1, 2, 3]
    assert choose_tpa_steps(lp, 2).tolist() == [1, 3]
