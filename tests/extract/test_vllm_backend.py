"""`extract --backend vllm` end to end with a fake engine that implements vLLM's documented
interface from the same transformers teacher: the cache must equal the hf backend's (LLaVA and
Qwen2.5-VL teachers)."""

import numpy as np
import pytest

from alignti.errors import AlignTIError
from alignti.extract import vllm_backend
from alignti.extract.run import ExtractConfig, run_extract, vllm_teacher
from alignti.extract.vllm_backend import VllmEngine
from alignti.models.family import load_parts
from alignti.models.loading import load_model
from alignti.models.family import save_model_dir
from alignti.storage.reader import CacheReader
from alignti.storage.schema import LOGPROB_STEP, CacheSettings
from tests.extract.fake_vllm import FakeLLM, SamplingParams
from tests.helpers.families import EXTRACT, family_world
from tests.helpers.models import shapes_teacher, sharpen

EXACT = ("resp_positions", "topk_ids", "tpa_rows", "tpa_cand_ids", "tpa_topk_ids", "iva_positions", "iva_topk_ids")
LOGPROBS = ("topk_logprobs", "tpa_cand_logprobs", "tpa_topk_logprobs", "iva_topk_logprobs")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm")
    model, processor, shapes = shapes_teacher(root, n=20, seed=3)
    teacher = save_model_dir(sharpen(model), processor, root / "teacher")  # peaked: no near-ties in the top-k
    return root, teacher, shapes


@pytest.fixture
def fake_engine(monkeypatch):
    engines = []

    def create(teacher, max_logprobs, dtype, max_model_len, gpu_memory):
        engines.append(VllmEngine(FakeLLM(load_model(teacher), load_parts(teacher), max_logprobs), SamplingParams))
        return engines[-1]

    monkeypatch.setattr(vllm_backend.VllmEngine, "create", staticmethod(create))
    return engines


def cfg(world, out, **kw):
    _, teacher, shapes = world
    base = dict(teacher=str(teacher), data=str(shapes / "train.json"), image_root=str(shapes), out=str(out),
                top_k=8, tpa_d=2, tpa_top_k=4, iva_layer="1", iva_max_positions=4, iva_top_k=4, batch_size=4,
                irs_samples=8)
    base.update(kw)
    return ExtractConfig(**base)


def content(path):
    r = CacheReader.open(str(path))
    return {s.sample_id: s for s in r.get_batch(list(range(len(r))))}


def assert_same_signals(hf: dict, vl: dict) -> None:
    assert set(hf) == set(vl)
    for sid, a in hf.items():
        b = vl[sid]
        assert a.tpa_cand_ids.shape[0] > 0 and a.iva_positions.size > 0
        for name in EXACT:
            np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=f"{sid} {name}")
        for name in LOGPROBS:  # fp32 noise may move a value across one quantisation step
            np.testing.assert_allclose(getattr(a, name), getattr(b, name), atol=1.01 * LOGPROB_STEP + 1e-5)
        np.testing.assert_allclose(a.saliency, b.saliency, atol=1e-5)


def test_vllm_backend_equals_hf_backend(world, tmp_path, fake_engine):
    run_extract(cfg(world, tmp_path / "hf"))
    run_extract(cfg(world, tmp_path / "vllm", backend="vllm"))
    hf, vl = content(tmp_path / "hf"), content(tmp_path / "vllm")
    assert len(hf) == 20 and all(a.iva_positions.shape == (4,) for a in hf.values())
    assert_same_signals(hf, vl)
    # candidates: one request each, on top of one prompt-log-prob request per sample
    n_cand = sum(s.tpa_cand_ids.size for s in vl.values())
    assert fake_engine[0].llm.requests == len(vl) + n_cand


def test_qwen_vl_teacher_equals_hf_backend(tmp_path_factory, tmp_path, fake_engine):
    """Prompts hold the expanded `<|image_pad|>` run and the image, as vLLM takes processed Qwen-VL prompts
    (it computes M-RoPE itself, as the fake engine's model does); saliency comes from the cut teacher with
    the family's positions. Images of three sizes: three vision-token counts."""
    world = family_world(tmp_path_factory, "qwen2_5_vl")
    run_extract(ExtractConfig(teacher=str(world.teacher), data=str(world.corpus), image_root=str(world.shapes),
                              out=str(tmp_path / "vllm"), backend="vllm", **EXTRACT))
    hf, vl = content(world.cache), content(tmp_path / "vllm")
    assert {a.n_v for a in hf.values()} == {15, 16, 24}
    assert_same_signals(hf, vl)


def test_saliency_model_is_cut_after_the_iva_layer(world, tmp_path, fake_engine):
    settings = CacheSettings(top_k=8, tpa_d=2, tpa_top_k=4, iva_layer=1, iva_top_k=4)
    teacher = load_model(world[1])
    signals = vllm_teacher(cfg(world, tmp_path / "c", backend="vllm"), settings, "cpu", teacher.dtype,
                           teacher.config.image_token_id)
    assert len(signals.saliency_model.model.language_model.layers) == 2  # layers 0..1 of 3


def test_auto_layer_and_kd_only(world, tmp_path, fake_engine):
    s = run_extract(cfg(world, tmp_path / "auto", backend="vllm", iva_layer="auto"))
    ref = run_extract(cfg(world, tmp_path / "auto_hf", iva_layer="auto"))
    assert s["iva_layer"] == ref["iva_layer"]
    run_extract(cfg(world, tmp_path / "kd", backend="vllm", iva_layer="none", tpa_d=0))
    one = next(iter(content(tmp_path / "kd").values()))
    assert one.topk_ids.shape[1] == 8 and one.saliency.size == 0 and one.tpa_rows.size == 0
    assert CacheReader.open(str(tmp_path / "kd")).manifest.extra["backend"] == "vllm"


def test_changed_prompt_is_a_clear_error(world, tmp_path, monkeypatch):
    class Expanding(FakeLLM):  # an engine whose image expansion differs from ours
        def _one(self, prompt, params):
            out = super()._one(prompt, params)
            out.prompt_token_ids = out.prompt_token_ids + [0]
            return out

    _, teacher, _ = world
    monkeypatch.setattr(vllm_backend.VllmEngine, "create", staticmethod(
        lambda *a: VllmEngine(Expanding(load_model(teacher), load_parts(teacher), 8), SamplingParams)))
    with pytest.raises(AlignTIError, match="image expansion differs"):
        run_extract(cfg(world, tmp_path / "bad", backend="vllm", iva_layer="none", tpa_d=0, limit=2))


def test_missing_logprobs_are_errors(world, tmp_path, monkeypatch):
    _, teacher, _ = world
    monkeypatch.setattr(vllm_backend.VllmEngine, "create", staticmethod(
        lambda *a: VllmEngine(FakeLLM(load_model(teacher), load_parts(teacher), 8), SamplingParams)))
    with pytest.raises(ValueError, match="max_logprobs"):  # k=16 > the engine's max_logprobs=8
        run_extract(cfg(world, tmp_path / "k", backend="vllm", iva_layer="none", tpa_d=0, top_k=16, limit=2))
