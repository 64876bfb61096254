import itertools

import pytest
import torch

from alignti.extract.irs_score import choose_layer, irs_scores, irs_scores_by_grid


def test_irs_matches_pairwise_loop():
    torch.manual_seed(0)
    alphas = torch.rand(5, 3, 7, dtype=torch.float64)
    alphas = alphas / alphas.sum(-1, keepdim=True)
    got = irs_scores(alphas)
    for layer in range(3):
        cos = [torch.nn.functional.cosine_similarity(alphas[i, layer], alphas[j, layer], dim=0).item()
               for i, j in itertools.permutations(range(5), 2)]
        assert got[layer].item() == pytest.approx(1 - sum(cos) / len(cos), abs=1e-9)


def test_identical_attention_scores_zero_and_distinct_scores_high():
    same = torch.ones(4, 1, 6) / 6
    onehot = torch.eye(4, 6)[:, None, :]  # each sample attends to a different vision token
    scores = irs_scores(torch.cat([same, onehot], dim=1))
    assert scores[0].item() == pytest.approx(0.0, abs=1e-12)
    assert scores[1].item() == pytest.approx(1.0, abs=1e-12)
    assert choose_layer(scores) == 1


def test_irs_by_grid_compares_only_same_grid_pairs():
    torch.manual_seed(1)
    groups = [torch.rand(3, 2, 6, dtype=torch.float64), torch.rand(1, 2, 15, dtype=torch.float64),
              torch.rand(4, 2, 24, dtype=torch.float64)]
    got = irs_scores_by_grid(groups)
    for layer in range(2):
        cos = [torch.nn.functional.cosine_similarity(g[i, layer], g[j, layer], dim=0).item()
               for g in groups for i, j in itertools.permutations(range(g.shape[0]), 2)]
        assert len(cos) == 6 + 0 + 12
        assert got[layer].item() == pytest.approx(1 - sum(cos) / len(cos), abs=1e-9)
    assert torch.equal(irs_scores_by_grid(groups[:1]), irs_scores(groups[0]))
    with pytest.raises(ValueError, match="same vision-token grid"):
        irs_scores_by_grid([torch.rand(1, 2, 6), torch.rand(1, 2, 15)])
