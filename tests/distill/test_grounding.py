"""The grounding term (`--ground-weight`): box targets, the term against eager attention in
float64, its gradient reaching only the layers it should, and a training run that lowers it."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from alignti.data.boxes import boxes_distribution
from alignti.data.corpus import read_corpus
from alignti.data.encode import SampleEncoder
from alignti.distill.batches import build_distill_batch
from alignti.distill.examples import corpus_examples
from alignti.distill.grounding import grounding_target, question_boxes
from alignti.distill.config import LossConfig
from alignti.distill.objective import Objective
from alignti.distill.train import run_distill
from alignti.errors import AlignTIError
from alignti.models.family import load_parts
from alignti.models.loading import load_model
from tests.distill.worlds import distill_config, read_log, run_world
from tests.helpers.models import pixels


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return run_world(tmp_path_factory)


def test_boxes_distribution_on_the_patch_grid():
    np.testing.assert_allclose(boxes_distribution(4, (64, 64), [[0, 0, 20, 20]]), [1, 0, 0, 0])
    np.testing.assert_allclose(boxes_distribution(4, (64, 64), [[0, 0, 20, 20], [40, 40, 60, 60]]), [.5, 0, 0, .5])
    # a box across the vertical midline: its area split 1:3 between two patches
    np.testing.assert_allclose(boxes_distribution(4, (64, 64), [[24, 0, 56, 10]]), [.25, .75, 0, 0])
    assert boxes_distribution(4, (64, 64), []) is None
    assert boxes_distribution(5, (64, 64), [[0, 0, 20, 20]]) is None  # not a square grid
    assert boxes_distribution(4, (64, 64), [[70, 70, 80, 80]]) is None  # outside the image


def test_question_boxes_reads_per_turn_annotations():
    assert question_boxes({"qa": [{"relevant_boxes": [[0, 0, 1, 1]]}, {"relevant_boxes": []}]}) == [[[0, 0, 1, 1]], []]
    assert question_boxes({"relevant_boxes": [[0, 0, 1, 1]]}) == [[[0, 0, 1, 1]]]
    assert question_boxes({"qa": [{"answer": "x"}]}) is None and question_boxes({}) is None


def test_grounding_targets_of_a_shapes_corpus(world):
    processor = load_parts(world.student)
    encoder = SampleEncoder(processor, str(world.shapes), 256)
    seen = 0
    for row in read_corpus(str(world.corpus)):
        sample = encoder.encode(row)
        target = grounding_target(sample)
        boxes = [q["relevant_boxes"] for q in row.extra["qa"]]
        assert (target is None) == any(not b for b in boxes)
        if target is None:
            continue
        seen += 1
        assert target.shape == (sample.n_v,) and abs(float(target.sum()) - 1) < 1e-6
        covered = sum(boxes_distribution(sample.n_v, sample.image_size, b) > 0 for b in boxes)
        assert (target[covered == 0] == 0).all()  # no mass on a patch no asked-about box touches
    assert seen >= 10
    text_only = dataclasses.replace(sample, n_v=0, image_size=None)
    assert grounding_target(text_only) is None


def _eager_reference(model, examples, layer: int) -> tuple[float, int]:
    """sum over samples with a target of KL(g || a) in float64, a from an eager forward per sample."""
    model.set_attn_implementation({"text_config": "eager"})
    total, count = 0.0, 0
    for e in examples:
        s = e.student
        g = grounding_target(s)
        if g is None:
            continue
        with torch.no_grad():
            out = model(input_ids=s.input_ids[None], pixel_values=pixels(s), output_attentions=True)
        att = out.attentions[layer][0].double()  # [H, T, T]
        a = att[:, s.instruction_positions][:, :, s.vision_positions].mean(dim=(0, 1))  # [n_v]
        a = a / a.sum()
        g64 = torch.from_numpy(g).double()
        nz = g64 > 0
        total += float((g64[nz] * (g64[nz].log() - a[nz].log())).sum())
        count += 1
    model.set_attn_implementation({"text_config": "sdpa"})
    return total, count


def test_ground_term_equals_eager_attention_and_trains_only_layers_up_to_it(world):
    model = load_model(world.student).double()  # 2 LM layers
    processor = load_parts(world.student)
    examples, _ = corpus_examples(str(world.corpus), SampleEncoder(processor, str(world.shapes), 256))
    examples = examples.get_many(range(8))
    cfg = LossConfig("sft", ground_weight=1.0, ground_layer=0)
    batch = build_distill_batch(examples, processor.tokenizer.pad_token_id, model.config.image_token_id, cfg,
                                "cpu", torch.float64)
    terms = Objective(model, cfg, ground_layer=0)(batch)
    ref_sum, ref_count = _eager_reference(model, examples, 0)
    got_sum, got_count = (t.item() for t in terms["ground"])
    assert ref_count > 0 and got_count == ref_count == batch.counts()["ground"]
    assert abs(got_sum - ref_sum) < 1e-6 * max(1.0, ref_sum)
    model.zero_grad()
    terms["ground"][0].backward()
    grads = {n: p.grad for n, p in model.named_parameters() if "language_model.layers." in n}
    assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if ".layers.0.self_attn.q_proj" in n)
    assert all(g is None or g.abs().sum() == 0 for n, g in grads.items() if ".layers.1." in n)


def test_ground_weight_without_boxes_or_cache_rules(world, tmp_path):
    base = dict(student=str(world.student), data=str(world.corpus), image_root=str(world.shapes), recipe="sft")
    distill_config(out=str(tmp_path / "a"), ground_weight=1.0, **base)  # no cache needed
    with pytest.raises(AlignTIError, match="only the sft and ground terms"):
        distill_config(out=str(tmp_path / "b"), ground_weight=1.0, kd_weight=1.0, **base)
    with pytest.raises(AlignTIError, match="--ground-layer 5 is outside"):
        run_distill(distill_config(out=str(tmp_path / "c"), ground_weight=1.0, ground_layer=5, max_steps=1,
                                  save_every=0, progress=False, **base))


def test_training_with_ground_weight_lowers_the_term(world, tmp_path):
    out = tmp_path / "ground"
    run_distill(distill_config(student=str(world.student), data=str(world.corpus), image_root=str(world.shapes),
                              out=str(out), recipe="sft", ground_weight=1.0, ground_layer=1, lr=1e-2, batch_size=8,
                              max_steps=60, epochs=100, save_every=0, progress=False, train="full"))
    ground = [r["ground"] for r in read_log(out) if "ground" in r]
    assert len(ground) == 60 and all(np.isfinite(ground))
    assert np.mean(ground[-10:]) < 0.6 * np.mean(ground[:10]), ground
