"""vLLM prompt log-probs -> our top-k rows, on recorded structures of vLLM's documented shape."""

import numpy as np
import pytest

from alignti.errors import AlignTIError
from alignti.extract.run import ExtractConfig
from alignti.extract.vllm_backend import check_vllm_settings, prompt_logprobs_to_topk
from tests.extract.fake_vllm import Logprob


def recorded():
    # prompt tokens [5, 9, 2, 7]; PromptLogprobs = list[dict[int, Logprob] | None], entry 0 is None.
    # Entry i predicts token i: top-2 ranks plus the actual token when it is outside the top-2.
    return [
        None,
        {9: Logprob(-0.5, 1, "b"), 3: Logprob(-1.2, 2, "c")},
        {4: Logprob(-0.3, 1, "d"), 1: Logprob(-2.0, 2, "e"), 2: Logprob(-4.5, 7, "f")},  # actual token rank 7
        {1: Logprob(-1.1, 2, "e"), 7: Logprob(-0.9, 1, "g")},  # dict order is not rank order
    ]


def test_rows_follow_rank_and_drop_actual_token_outside_topk():
    ids, lps = prompt_logprobs_to_topk(recorded(), positions=[0, 1, 2], k=2)
    assert ids.tolist() == [[9, 3], [4, 1], [7, 1]]
    np.testing.assert_allclose(lps, [[-0.5, -1.2], [-0.3, -2.0], [-0.9, -1.1]])
    assert ids.dtype == np.int32 and lps.dtype == np.float32


def test_missing_entries_are_errors():
    with pytest.raises(ValueError, match="no log-probs at prompt position 4"):
        prompt_logprobs_to_topk(recorded(), positions=[3], k=2)
    with pytest.raises(ValueError, match="max_logprobs"):
        prompt_logprobs_to_topk(recorded(), positions=[0], k=3)


def test_vllm_backend_refuses_sampled_proposals_only():
    with pytest.raises(AlignTIError, match="tpa-proposal top only"):
        check_vllm_settings(tpa_d=4, tpa_proposal="sample")
    with pytest.raises(AlignTIError, match="tpa-proposal top only"):
        ExtractConfig(teacher="t", data="d", image_root="r", out="o", backend="vllm", tpa_proposal="sample")
    check_vllm_settings(tpa_d=0, tpa_proposal="sample")
    ExtractConfig(teacher="t", data="d", image_root="r", out="o", backend="vllm")  # IVA + TPA (top) are fine
