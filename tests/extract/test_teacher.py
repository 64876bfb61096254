"""Teacher signals against brute-force references from plain full-vocab forwards."""

import pytest
import torch

from alignti.data.batching import collate
from alignti.data.corpus import read_corpus
from alignti.data.encode import SampleEncoder
from alignti.data.shapes import ShapesConfig, run_shapes
from alignti.extract.teacher import HfTeacher
from alignti.extract.teacher_output import ResponseRows, TeacherOutput, to_sample_signals
from alignti.models.probe import probe_targets
from alignti.models.family import load_parts
from alignti.models.loading import load_model
from alignti.storage.schema import CacheSettings
from alignti.storage.validation import validate_sample
from tests.helpers.models import pixels


@pytest.fixture(scope="module")
def setup(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    run_shapes(ShapesConfig(out=str(root), n=8, seed=3))
    processor = load_parts(tiny_model_dir)
    enc = SampleEncoder(processor, str(root), 512)
    samples = [enc.encode(r) for r in read_corpus(root / "train.json")][:3]
    model = load_model(tiny_model_dir)
    torch.manual_seed(0)
    with torch.no_grad():  # a sharper random model: attention and logits far from uniform
        for p in model.parameters():
            p.mul_(4.0)
    return model, processor, samples


@pytest.mark.parametrize("proposal", ["top", "sample"])
def test_signals_equal_brute_force(setup, proposal):
    model, processor, samples = setup
    settings = CacheSettings(top_k=8, tpa_d=3, tpa_top_k=5, tpa_proposal=proposal, iva_layer=1,
                             iva_max_positions=6, iva_top_k=4)
    pad = processor.tokenizer.pad_token_id
    out = HfTeacher(model, settings, pad, chunk_size=7)(collate(samples, pad))
    for s, sig in zip(samples, out):
        with torch.no_grad():
            ref = torch.log_softmax(model(input_ids=s.input_ids[None], pixel_values=pixels(s))
                                    .logits[0].double(), -1)
        resp = s.resp_positions
        assert sig.resp_positions.tolist() == resp.tolist()
        rv, ri = ref[resp].topk(8, -1)
        assert torch.equal(torch.from_numpy(sig.topk_ids).long(), ri)
        assert torch.allclose(torch.from_numpy(sig.topk_logprobs).double(), rv, atol=1e-4)
        # TPA: every step gets 3 candidates other than the ground truth, with their teacher log-probs
        assert sig.tpa_rows.tolist() == list(range(len(resp)))
        for r, cands, cand_lp, tids, tlps in zip(sig.tpa_rows, sig.tpa_cand_ids, sig.tpa_cand_logprobs,
                                                 sig.tpa_topk_ids, sig.tpa_topk_logprobs):
            t = int(resp[r])
            assert int(s.input_ids[t + 1]) not in cands.tolist()
            if proposal == "top":
                banned = (int(s.input_ids[t + 1]), model.config.image_token_id)
                others = [i for i in ri[r].tolist() if i not in banned][:3]
                assert cands.tolist() == others
            assert torch.allclose(torch.from_numpy(cand_lp).double(), ref[t, torch.from_numpy(cands).long()], atol=1e-4)
            for a, ids_a, lps_a in zip(cands.tolist(), tids, tlps):  # separate forward of (y_<=t, a)
                seq = torch.cat([s.input_ids[: t + 1], torch.tensor([a])])[None]
                with torch.no_grad():
                    row = torch.log_softmax(model(input_ids=seq, pixel_values=pixels(s)).logits[0, -1].double(), -1)
                v, i = row.topk(5)
                assert ids_a.tolist() == i.tolist()
                assert torch.allclose(torch.from_numpy(lps_a).double(), v, atol=1e-4)
        # IVA rows: top-k_v at the most salient vision positions
        assert sig.saliency.shape == (s.n_v,) and abs(sig.saliency.sum() - 1) < 1e-5
        order = torch.from_numpy(sig.saliency).topk(6).indices
        assert sig.iva_positions.tolist() == order.tolist()
        v, i = ref[s.vision_start + order].topk(4, -1)
        assert torch.equal(torch.from_numpy(sig.iva_topk_ids).long(), i)
        assert torch.allclose(torch.from_numpy(sig.iva_topk_logprobs).double(), v, atol=1e-4)


def test_saliency_equals_eager_attentions(setup):
    model, processor, samples = setup
    settings = CacheSettings(top_k=4, tpa_d=0, iva_layer=1, iva_max_positions=4, iva_top_k=2)
    pad = processor.tokenizer.pad_token_id
    out = HfTeacher(model, settings, pad)(collate(samples, pad))
    model.set_attn_implementation({"text_config": "eager"})
    try:
        queries, keys = probe_targets(tuple(samples))
        for s, sig, q, k in zip(samples, out, queries, keys):
            with torch.no_grad():
                att = model(input_ids=s.input_ids[None], pixel_values=pixels(s), output_attentions=True).attentions[1]
            alpha = att[0].double().mean(0)[q][:, k].mean(0)
            alpha = alpha / alpha.sum()
            assert torch.allclose(torch.from_numpy(sig.saliency).double(), alpha, atol=1e-5)
            assert sig.tpa_cand_ids.shape == (0, 0)
    finally:
        model.set_attn_implementation({"text_config": "sdpa"})


def test_absent_signals_are_explicit_and_written_as_empty_arrays(setup):
    """A backend states "no TPA / no IVA" as None (leaving a field out is a TypeError); the
    conversion gives the schema's empty shapes, which the writer's validation accepts."""
    _, _, samples = setup
    settings = CacheSettings(top_k=4, tpa_d=3, tpa_top_k=5, iva_layer=1, iva_top_k=2)
    s = samples[0]
    n_r = s.resp_positions.numel()
    response = ResponseRows(s.resp_positions, torch.arange(4).repeat(n_r, 1), torch.full((n_r, 4), -1.0))
    with pytest.raises(TypeError):
        TeacherOutput(response)
    sig = validate_sample(to_sample_signals(s, TeacherOutput(response, tpa=None, iva=None), settings), settings)
    assert sig.topk_ids.shape == (n_r, 4) and sig.resp_positions.tolist() == s.resp_positions.tolist()
    assert sig.tpa_rows.shape == (0,) and sig.tpa_cand_ids.shape == sig.tpa_cand_logprobs.shape == (0, 3)
    assert sig.tpa_topk_ids.shape == sig.tpa_topk_logprobs.shape == (0, 3, 5)
    assert sig.saliency.shape == sig.iva_positions.shape == (0,) and sig.iva_topk_ids.shape == (0, 2)
