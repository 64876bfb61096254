"""Vision-tower pretraining for the demo: labels, learning, copying into other models."""

import torch

from alignti.data.shapes import ShapesConfig, run_shapes
from alignti.data.shapes_render import COLORS, SHAPES
from alignti.models.family import load_parts
from alignti.models.loading import load_model
from alignti.models.family import save_model_dir
from alignti.models.llava import TinySpec, build_tiny_llava
from alignti.models.tokenizer import train_tokenizer
from alignti.demo.tower import copy_tower, patch_labels, pretrain_tower, shapes_tower_data


def test_patch_labels_by_hand():
    objects = [{"box": [3, 3, 20, 20], "color": "red", "shape": "circle"},
               {"box": [40, 44, 60, 62], "color": "blue", "shape": "triangle"}]
    lab = patch_labels(objects, 64, 2)
    red, circle = 1 + list(COLORS).index("red"), 1 + list(SHAPES).index("circle")
    blue, tri = 1 + list(COLORS).index("blue"), 1 + list(SHAPES).index("triangle")
    assert lab["color"].tolist() == [red, 0, 0, blue] and lab["shape"].tolist() == [circle, 0, 0, tri]
    assert lab["quadrant"].tolist() == [0, 1, 2, 3]
    lab4 = patch_labels(objects, 64, 4)  # 16 px patches: the red box [3, 20) touches patches 0, 1, 4, 5
    assert lab4["color"].nonzero().flatten().tolist() == [0, 1, 4, 5, 10, 11, 14, 15]
    assert lab4["quadrant"].view(4, 4).tolist() == [[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]]


def test_pretrain_learns_and_copy_moves_only_the_tower(tmp_path):
    torch.manual_seed(0)
    run_shapes(ShapesConfig(out=str(tmp_path / "s"), n=60, seed=2))
    tok = train_tokenizer(["what colour is the red circle"] * 4, vocab_size=120)
    model, proc = build_tiny_llava(TinySpec(image_size=32, patch=16, vision_hidden=32), tok)
    src = save_model_dir(model, proc, tmp_path / "src")
    other = save_model_dir(*build_tiny_llava(TinySpec(image_size=32, patch=16, vision_hidden=32, seed=5), tok),
                           tmp_path / "other")
    model = load_model(src)
    pixels, labels = shapes_tower_data(str(tmp_path / "s" / "train.json"), str(tmp_path / "s"), load_parts(src), 2)
    assert pixels.shape[1:] == (3, 32, 32) and labels["color"].shape == (pixels.shape[0], 4)
    result = pretrain_tower(model, pixels, labels, steps=200, lr=3e-3)
    assert result.accuracy["color"] >= 0.9 and result.accuracy["quadrant"] >= 0.9, result
    before = load_model(other)
    copy_tower(model, [other])
    after = load_model(other)
    for (name, a), b in zip(after.state_dict().items(), before.state_dict().values()):
        want = model.state_dict()[name] if "vision_tower" in name else b
        assert torch.equal(a, want), name
