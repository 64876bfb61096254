"""IRS from the probe equals IRS computed directly from eager attentions; `alignti irs` writes its files."""

import itertools
import json

import pytest
import torch

from alignti.data.corpus import read_corpus
from alignti.data.encode import SampleEncoder
from alignti.cliargs import build, read_run_file
from alignti.errors import AlignTIError
from alignti.extract.irs import IrsConfig, calibration_samples, compute_irs, run_irs
from alignti.models.probe import probe_targets
from alignti.models.family import load_parts
from alignti.models.loading import load_model
from alignti.models.family import save_model_dir
from tests.helpers.models import shapes_teacher, pixels


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("irs")
    model, processor, shapes = shapes_teacher(root, n=12, seed=2)
    with torch.no_grad():  # sharper than a fresh init, so layers differ
        for p in model.parameters():
            p.mul_(4.0)
    return save_model_dir(model, processor, root / "teacher"), shapes


def test_irs_equals_direct_computation_from_eager_attentions(world):
    teacher, shapes = world
    model, processor = load_model(teacher), load_parts(teacher)
    enc = SampleEncoder(processor, str(shapes), 512)
    samples = [enc.encode(r) for r in read_corpus(shapes / "train.json")][:6]
    got = compute_irs(model, samples, processor.tokenizer.pad_token_id, batch_size=4)
    model.set_attn_implementation({"text_config": "eager"})
    queries, keys = probe_targets(tuple(samples))
    alphas = []  # [S][L] vectors over the vision tokens
    for s, q, k in zip(samples, queries, keys):
        with torch.no_grad():
            att = model(input_ids=s.input_ids[None], pixel_values=pixels(s), output_attentions=True).attentions
        per_layer = []
        for a in att:
            v = a[0].double().mean(0)[q][:, k].mean(0)
            per_layer.append(v / v.sum())
        alphas.append(per_layer)
    for layer in range(3):
        cos = [torch.nn.functional.cosine_similarity(alphas[i][layer], alphas[j][layer], dim=0).item()
               for i, j in itertools.permutations(range(len(samples)), 2)]
        assert got[layer].item() == pytest.approx(1 - sum(cos) / len(cos), abs=1e-5)


def test_irs_command_writes_scores_and_plot(world, tmp_path):
    teacher, shapes = world
    out = tmp_path / "irs.json"
    cfg = IrsConfig(teacher=str(teacher), data=str(shapes / "train.json"), image_root=str(shapes), out=str(out),
                    samples=8, batch_size=4)
    res = run_irs(cfg)
    saved = json.loads(out.read_text())
    assert saved == res and len(saved["scores"]) == 3 and saved["num_samples"] == 8
    assert saved["layer"] == max(range(3), key=lambda i: saved["scores"][i])
    model, processor = load_model(teacher), load_parts(teacher)
    samples = calibration_samples(SampleEncoder(processor, str(shapes), 2048), str(shapes / "train.json"), 8)
    assert saved["scores"] == compute_irs(model, samples, processor.tokenizer.pad_token_id, 4).tolist()  # exact
    assert out.with_suffix(".png").stat().st_size > 0
    assert build(IrsConfig, read_run_file(out.with_suffix(".yaml"))) == cfg  # `alignti irs --config irs.yaml`


def test_irs_command_needs_two_usable_samples(world, tmp_path, monkeypatch):
    """Too few calibration samples is the corpus's fault: one line, before the model is loaded."""
    import alignti.extract.irs as irs

    teacher, shapes = world
    monkeypatch.setattr(irs, "load_model", lambda *a, **k: pytest.fail("model loaded before the check"))
    with pytest.raises(AlignTIError, match="2 usable samples"):
        run_irs(IrsConfig(teacher=str(teacher), data=str(shapes / "train.json"), image_root=str(shapes),
                          out=str(tmp_path / "irs.json"), samples=1))
    assert not (tmp_path / "irs.json").exists()
