"""Distillation from each model family's cache: the loss terms of one micro-batch holding images of three
sizes (Qwen-VL: three vision-token counts, M-RoPE ribbon) equal brute force with separate forwards;
the attention target equals eager attention over each sample's own vision tokens; a student whose
image processor gives other vision-token counts is refused IVA in one line naming the sample, and
still distils with KD / TPA; every recipe trains and only the merger trains with --train projector."""

from __future__ import annotations

import pytest
import torch

from alignti.data.encode import SampleEncoder
from alignti.distill.batches import build_distill_batch
from alignti.distill.config import LossConfig
from alignti.distill.examples import cache_examples
from alignti.distill.objective import student_iva_layer
from alignti.distill.train import run_distill
from alignti.errors import AlignTIError
from alignti.models.family import load_parts
from alignti.models.loading import load_model
from alignti.storage.reader import CacheReader
from tests.distill.test_batches import REF_RTOL, _values, brute_force
from tests.distill.worlds import distill_config, objective_terms, weights
from tests.helpers.families import FAMILY_NAMES, QWEN_NAMES, STUDENTS, build_model, eager_attentions, family_world
from tests.helpers.models import sharpen


@pytest.fixture(scope="module", params=FAMILY_NAMES)
def setup(request, tmp_path_factory):
    world = family_world(tmp_path_factory, request.param)
    return world, *_student(world, world.student)


def _student(world, student_dir):
    """(sharpened fp32 student, its parts, the cache's examples encoded by it, the cache reader)."""
    parts = load_parts(student_dir)
    reader = CacheReader.open(str(world.cache))
    examples, rejects = cache_examples(reader, SampleEncoder(parts, None, 256), None)
    assert rejects == [] and len(examples) == 16
    return sharpen(load_model(student_dir), seed=3), parts, list(examples), reader


def _terms(model, parts, examples, reader, cfg):
    batch = build_distill_batch(examples, parts.tokenizer.pad_token_id, parts.image_token_id, cfg, "cpu",
                                torch.float32, vocab_size=model.get_input_embeddings().num_embeddings)
    depth = reader.manifest.teacher_fingerprint["num_hidden_layers"]
    return batch, _values(objective_terms(model, batch, cfg, reader.manifest.settings.iva_layer, depth))


def test_terms_equal_brute_force_from_the_cache(setup):
    world, model, parts, examples, reader = setup
    assert len({e.student.n_v for e in examples}) == (1 if world.family == "llava" else 3)
    cfg = LossConfig("alignti", chunk_size=5)
    batch, got = _terms(model, parts, examples, reader, cfg)
    assert batch.is_ribbon
    ref = brute_force(model, examples)
    assert ref["tpa"][1] > 20 and ref["iva"][1] == 16  # every term has data
    for name in ("sft", "kd", "iva", "tpa"):
        assert got[name][1] == ref[name][1] == batch.counts()[name], name
        assert got[name][0] == pytest.approx(ref[name][0], rel=REF_RTOL), name


def test_attention_target_equals_eager_attention(setup):
    world, model, parts, examples, reader = setup
    cfg = LossConfig("alignti", iva_target="attention")
    batch, got = _terms(model, parts, examples, reader, cfg)
    layer = student_iva_layer(reader.manifest.settings.iva_layer, 3, 2)  # distill's default student layer
    total = 0.0
    for e in examples:
        s = e.student
        att = eager_attentions(model, s.input_ids, s.images)[layer][0].double().mean(0)  # [T, T]
        a = att[s.instruction_positions][:, s.vision_positions].mean(0)
        a = (a / a.sum()).clamp_min(1e-8)
        w = torch.from_numpy(e.signals.saliency).double()
        w = w / w.sum()
        total += float((w * (w.log() - a.log())).sum())
    assert got["iva"][1] == 16.0
    assert got["iva"][0] == pytest.approx(total, rel=1e-4)


@pytest.mark.parametrize("family", QWEN_NAMES)
def test_other_resolution_settings_refuse_iva_and_keep_kd(tmp_path_factory, tmp_path, family):
    """max_pixels 3840: the 64x64 images shrink to 48x48 (9 tokens instead of 16), 64x96 to 64x48 (12, not
    24); the 80x48 ones (3840 pixels) keep their 15."""
    world = family_world(tmp_path_factory, family)
    from transformers import AutoTokenizer

    other = build_model(family, dict(STUDENTS["student"], max_pixels=3840), AutoTokenizer.from_pretrained(world.teacher),
                        tmp_path / "other")
    base = dict(cache=str(world.cache), student=str(other), lr=1e-3, batch_size=4, max_steps=1, save_every=0,
                progress=False)
    with pytest.raises(AlignTIError, match=r"^IVA needs the student's vision-token count to equal the teacher's: "
                                           r"sample [0-9a-f]{32} \(source 'shapes-\d+'\) has n_v=16 in the cache, "
                                           r"the student gives its image 9; use --iva-weight 0"):
        run_distill(distill_config(out=str(tmp_path / "iva"), recipe="alignti", **base))
    assert not (tmp_path / "iva").exists()
    model, parts, examples, reader = _student(world, other)
    assert sorted({(e.signals.n_v, e.student.n_v) for e in examples}) == [(15, 15), (16, 9), (24, 12)]
    cfg = LossConfig("alignti", iva_weight=0.0, chunk_size=5)
    _, got = _terms(model, parts, examples, reader, cfg)
    ref = brute_force(model, examples)  # rows after the image run shift by n_v_S - n_v_T
    for name in ("sft", "kd", "tpa"):
        assert got[name][1] == ref[name][1] and got[name][0] == pytest.approx(ref[name][0], rel=REF_RTOL), name
    summary = run_distill(distill_config(out=str(tmp_path / "kd"), recipe="alignti", iva_weight=0.0, **base))
    assert summary["steps"] == 1 and set(summary["final_losses"]) == {"loss", "sft", "kd", "tpa"}


@pytest.mark.parametrize("family", QWEN_NAMES)
def test_every_recipe_trains_and_projector_is_the_merger(tmp_path_factory, tmp_path, family):
    world = family_world(tmp_path_factory, family)
    for recipe in ("sft", "kd", "alignti"):
        s = run_distill(distill_config(cache=str(world.cache), student=str(world.student), out=str(tmp_path / recipe),
                                       recipe=recipe, lr=1e-3, batch_size=8, max_steps=1, save_every=0, progress=False))
        assert s["steps"] == 1 and all(v == v for v in s["final_losses"].values()), recipe
    before, after = weights(world.student), weights(tmp_path / "alignti" / "final")
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    tower = {k for k in before if "visual." in k and "merger" not in k}
    assert tower and not changed & tower and any("merger" in k for k in changed)  # --train all: tower frozen
    out = tmp_path / "projector"
    run_distill(distill_config(data=str(world.corpus), image_root=str(world.shapes), student=str(world.student),
                               out=str(out), recipe="sft", train="projector", lr=1e-2, batch_size=8, max_steps=1,
                               save_every=0, progress=False))
    before, after = weights(world.student), weights(out / "final")
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all("visual.merger" in k or "visual.deepstack_merger_list" in k for k in changed), changed
