import numpy as np
import pytest
import torch
from PIL import Image

from alignti.data.boxes import patch_overlap
from alignti.data.shapes import ShapesConfig, run_shapes
from alignti.demo.saliency import SaliencyItem, box_mass, object_patch_mass, overlay, peak_in_box, teacher_saliency
from alignti.extract.run import ExtractConfig, run_extract
from alignti.models.assemble import AssembleConfig, run_assemble
from alignti.models.family import load_parts
from alignti.models.loading import load_model
from alignti.storage.reader import CacheReader


def test_box_mass_whole_and_partial_patches():
    sal = np.array([0.7, 0.1, 0.1, 0.1], dtype=np.float32)  # 2x2 grid, row-major
    assert box_mass(sal, (64, 64), (0, 0, 32, 32)) == pytest.approx((0.7, 0.25))
    # box covers the right half of patch (0,0) and the left half of patch (0,1): 0.5*0.7 + 0.5*0.1
    assert box_mass(sal, (64, 64), (16, 0, 48, 32)) == pytest.approx((0.4, 0.25))
    # non-square image: coordinates scale per axis
    assert patch_overlap(2, (128, 64), (0, 32, 64, 64)).tolist() == [0, 0, 1, 0]


def test_overlay_draws_picture(tmp_path):
    sal = np.zeros(16, dtype=np.float32)
    sal[5] = 1
    item = SaliencyItem(sample=None, saliency=sal, box=(16, 16, 32, 32), image_size=(64, 64),
                        question="What colour is the circle?", answer="red")
    pic = overlay(Image.new("RGB", (64, 64), (200, 200, 200)), item, side=128)
    assert pic.size == (128, 164)
    arr = np.asarray(pic).astype(int)
    # the salient patch (row 1, col 1 of 4x4 -> pixels 32..64 of 128) keeps its brightness, the
    # others are dimmed to 20% (away from the printed numbers in each patch's top-left corner)
    assert arr[36 + 58, 58].tolist() == [200, 200, 200] and arr[36 + 120, 120].tolist() == [40, 40, 40]


def test_peak_in_box_by_hand():
    sal = np.zeros(16, dtype=np.float32)
    sal[5] = 1.0  # row 1, column 1 of a 4x4 grid: pixels [16, 32) x [16, 32) of a 64 px image
    assert peak_in_box(sal, (64, 64), (20, 20, 30, 30)) == (True, 1 / 16)
    assert peak_in_box(sal, (64, 64), (0, 0, 16, 16)) == (False, 1 / 16)
    hit, chance = peak_in_box(sal, (64, 64), (10, 10, 40, 20))  # touches rows 0-1, columns 0-2
    assert hit and chance == 6 / 16


def test_object_patch_mass_counts_whole_tokens():
    sal = np.array([0.7, 0.1, 0.15, 0.05], dtype=np.float32)  # 2x2 grid, row-major
    # a small box inside patch (0,0): box_mass is capped by the box's share of the patch, this is not
    assert object_patch_mass(sal, (64, 64), (4, 4, 20, 20)) == pytest.approx((0.7, 0.25))
    assert box_mass(sal, (64, 64), (4, 4, 20, 20))[0] == pytest.approx(0.7 * 0.25)
    # a box straddling patches (0,0) and (1,0): both tokens count
    assert object_patch_mass(sal, (64, 64), (4, 20, 20, 40)) == pytest.approx((0.85, 0.5))


def test_picture_saliency_is_the_cached_saliency(tmp_path):
    """The pictures show what extraction caches: `teacher_saliency` (one plain teacher pass with the
    probe) gives, at the same layer, the saliency `alignti extract` writes (fp16 there)."""
    run_shapes(ShapesConfig(out=str(tmp_path / "s"), n=30, seed=1))
    corpus, root = tmp_path / "s" / "train.json", tmp_path / "s"
    teacher = run_assemble(AssembleConfig(out=str(tmp_path / "t"), random=True, corpus=str(corpus), seed=0, hidden=64,
                                          layers=2, heads=4, kv_heads=2, vision_hidden=32, vision_layers=1,
                                          image_size=32, patch=8, vocab_size=320))
    model = load_model(teacher)
    with torch.no_grad():  # larger LM weights than the random init's: peaked, layer-dependent attention
        for name, p in model.named_parameters():
            if p.ndim == 2 and "language_model" in name and "embed" not in name:
                p.mul_(8)
    model.save_pretrained(teacher)
    run_extract(ExtractConfig(teacher=str(teacher), data=str(corpus), image_root=str(root), out=str(tmp_path / "c"),
                              iva_layer="1", tpa_d=0, top_k=4, iva_top_k=4, iva_max_positions=4))
    reader = CacheReader.open(str(tmp_path / "c"))
    cached = {s.sample_id: s.saliency for s in reader.get_batch(range(len(reader)))}
    processor = load_parts(teacher)
    items = {layer: teacher_saliency(model, processor, str(corpus), str(root), layer, limit=100) for layer in (0, 1)}
    assert len(items[1]) == len(cached) > 10
    for it in items[1]:
        assert it.saliency.shape == (16,) and it.saliency.sum() == pytest.approx(1, abs=1e-5)
        np.testing.assert_allclose(it.saliency, cached[it.sample.sample_id], atol=2e-3)
    # the check can tell layers apart: saliency is peaked and differs between them
    assert max(float(it.saliency.max() - it.saliency.min()) for it in items[1]) > 0.05
    assert max(float(np.abs(a.saliency - b.saliency).max()) for a, b in zip(items[0], items[1])) > 0.02
