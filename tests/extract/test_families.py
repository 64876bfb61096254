"""Every model family's cache against brute force: the signals `alignti extract` wrote (top-k rows,
TPA candidate rows, IVA saliency and rows, IRS scores) equal what separate plain forwards and eager
attentions of the teacher give, on a corpus whose images come in three sizes (Qwen-VL: three
vision-token grids, M-RoPE positions), and one batch of three image sizes equals the cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from alignti.data.batching import collate
from alignti.data.corpus import read_corpus
from alignti.data.encode import SampleEncoder
from alignti.errors import AlignTIError
from alignti.extract.irs import check_calibration
from alignti.extract.teacher import HfTeacher
from alignti.models.family import load_parts
from alignti.models.loading import load_model
from alignti.storage.reader import CacheReader
from alignti.storage.schema import LOGPROB_STEP
from tests.helpers.families import FAMILY_NAMES, eager_attentions, family_world, reference_logprobs

LP_ATOL = LOGPROB_STEP + 1e-4  # cache log-probs are rounded down to the step; fp32 vs float64 forwards
GRIDS = {"llava": {(4, 4)}, "qwen": {(4, 4), (3, 5), (6, 4)}}  # vision-token grids of the corpus images


@pytest.fixture(scope="module", params=FAMILY_NAMES)
def setup(request, tmp_path_factory):
    world = family_world(tmp_path_factory, request.param)
    parts = load_parts(world.teacher)
    encoder = SampleEncoder(parts, str(world.shapes), 256)
    samples = [encoder.encode(r) for r in read_corpus(world.corpus)]
    reader = CacheReader.open(str(world.cache))
    cached = {s.sample_id: s for s in reader.get_batch(list(range(len(reader))))}
    return world, load_model(world.teacher), parts, samples, cached, reader.manifest.settings


def _alpha(model, s, layer: int) -> torch.Tensor:
    """float64 [n_v]: eager attention of the instruction rows on the vision columns, head- and row-mean."""
    att = eager_attentions(model, s.input_ids, s.images)[layer][0].double().mean(0)  # [T, T]
    return att[s.instruction_positions][:, s.vision_positions].mean(0)


def test_cached_signals_equal_brute_force(setup):
    world, model, _, samples, cached, st = setup
    assert {s.images.grids[0] for s in samples} == GRIDS["llava" if world.family == "llava" else "qwen"]
    assert len(cached) == len(samples) == 16 and st.iva_layer is not None
    for s in samples:
        sig = cached[s.sample_id]
        ref = reference_logprobs(model, s.input_ids, s.images)
        resp = s.resp_positions
        assert sig.n_v == s.n_v and sig.resp_positions.tolist() == resp.tolist()
        values, ids = ref[resp].topk(st.top_k, -1)
        assert torch.equal(torch.from_numpy(sig.topk_ids).long(), ids)
        np.testing.assert_allclose(sig.topk_logprobs, values.numpy(), atol=LP_ATOL)
        # TPA: each candidate's row is a separate forward of (y_<=t, a), the model numbering it itself
        assert sig.tpa_rows.tolist() == list(range(len(resp)))
        for r, cands, cand_lp, tids, tlps in zip(sig.tpa_rows, sig.tpa_cand_ids, sig.tpa_cand_logprobs,
                                                 sig.tpa_topk_ids, sig.tpa_topk_logprobs):
            t = int(resp[r])
            np.testing.assert_allclose(cand_lp, ref[t, torch.from_numpy(cands).long()].numpy(), atol=LP_ATOL)
            for a, ids_a, lps_a in zip(cands.tolist(), tids, tlps):
                row = reference_logprobs(model, torch.cat([s.input_ids[: t + 1], torch.tensor([a])]), s.images)[-1]
                v, i = row.topk(st.tpa_top_k)
                assert ids_a.tolist() == i.tolist()
                np.testing.assert_allclose(lps_a, v.numpy(), atol=LP_ATOL)
        # IVA: saliency over the sample's own n_v tokens, and the rows at the most salient ones
        alpha = _alpha(model, s, st.iva_layer)
        w = alpha / alpha.sum()
        assert sig.saliency.shape == (s.n_v,)
        np.testing.assert_allclose(sig.saliency, w.numpy(), atol=2e-3, rtol=2e-3)  # stored as fp16
        order = w.topk(min(st.iva_max_positions, s.n_v)).indices
        assert sig.iva_positions.tolist() == order.tolist()
        v, i = ref[s.vision_start + order].topk(st.iva_top_k, -1)
        assert torch.equal(torch.from_numpy(sig.iva_topk_ids).long(), i)
        np.testing.assert_allclose(sig.iva_topk_logprobs, v.numpy(), atol=LP_ATOL)


def test_irs_compares_samples_of_the_same_grid(setup):
    """IRS(l) = 1 - mean cosine over ordered pairs of calibration samples sharing a vision-token grid."""
    world, model, _, samples, _, st = setup
    layers = model.config.get_text_config().num_hidden_layers
    ref = []
    for layer in range(layers):
        by_grid: dict = {}
        for s in samples:
            a = _alpha(model, s, layer)
            by_grid.setdefault(s.images.grids[0], []).append(a / a.norm())
        pairs = sum(len(g) * (len(g) - 1) for g in by_grid.values())
        cos = sum(float(x @ y) for g in by_grid.values() for i, x in enumerate(g) for j, y in enumerate(g) if i != j)
        ref.append(1 - cos / pairs)
    np.testing.assert_allclose(st.irs_scores, ref, atol=2e-6)
    assert st.iva_layer == int(np.argmax(ref)) and max(ref) > 1e-3  # the layers differ: a real choice


def test_one_batch_of_three_image_sizes_equals_the_cache(setup):
    world, model, parts, samples, cached, st = setup
    by_size = {}
    for s in samples:
        by_size.setdefault(s.image_size, s)
    picked = list(by_size.values()) + [samples[3]]
    assert len(by_size) == 3 and len({s.n_v for s in picked}) == (1 if world.family == "llava" else 3)
    batch = collate(picked, parts.tokenizer.pad_token_id)
    for s, sig in zip(picked, HfTeacher(model, st, parts.tokenizer.pad_token_id, chunk_size=5)(batch)):
        ref = cached[s.sample_id]
        for name in ("resp_positions", "topk_ids", "tpa_cand_ids", "tpa_topk_ids", "iva_positions", "iva_topk_ids"):
            np.testing.assert_array_equal(getattr(sig, name), getattr(ref, name), err_msg=name)
        for name in ("topk_logprobs", "tpa_cand_logprobs", "tpa_topk_logprobs", "iva_topk_logprobs"):
            np.testing.assert_allclose(getattr(sig, name), getattr(ref, name), atol=1.01 * LOGPROB_STEP + 1e-5)
        np.testing.assert_allclose(sig.saliency, ref.saliency, atol=1e-3)


def test_irs_refuses_calibration_without_two_images_of_one_grid(setup):
    world, _, _, samples, _, _ = setup
    one_per_grid = list({s.images.grids[0]: s for s in samples}.values())
    check_calibration(samples, "hint")
    if world.family == "llava":
        return  # one grid: any two samples pair
    with pytest.raises(AlignTIError, match=r"^IRS needs >= 2 usable samples with images of the same vision-token "
                                           r"grid, found 3 samples over 3 grid\(s\); hint$"):
        check_calibration(one_per_grid, "hint")
