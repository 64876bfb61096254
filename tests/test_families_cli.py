"""The acceptance sequence of every Qwen-VL family through the command line (in-process): a shapes
corpus, a random teacher, two students of different sizes sharing its tokenizer, a cache with the IVA
layer chosen by IRS, both students distilled with the alignti recipe, one evaluated, the cache
inspected; each step exits 0, and the distilled students reload with the plain transformers classes
and generate."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

from alignti.cli import cli
from tests.helpers.families import QWEN_NAMES


def alignti(*args: str) -> str:
    res = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    assert res.exit_code == 0, res.output[-3000:]
    return res.stdout


def last_json(output: str) -> dict:
    lines = output.splitlines()
    return json.loads("\n".join(lines[max(i for i, line in enumerate(lines) if line == "{"):]))


def generate_with_transformers(model_dir, image: Image.Image) -> torch.Tensor:
    """Reload with the Auto classes and generate greedily, the prompt expanded as Qwen-VL's processor does
    (one `<|image_pad|>` per vision token), positions from mm_token_type_ids: no alignti code involved."""
    model = AutoModelForImageTextToText.from_pretrained(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    pixels = AutoImageProcessor.from_pretrained(model_dir, backend="pil")(images=[image], return_tensors="pt")
    n_v = int(pixels["image_grid_thw"].prod()) // 4  # merge 2
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is the circle?"}]}]
    text = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    ids = torch.tensor([tok(text.replace("<|image_pad|>", "<|image_pad|>" * n_v), add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **pixels,
                             mm_token_type_ids=(ids == model.config.image_token_id).int(), max_new_tokens=3,
                             do_sample=False)
    return out[0, ids.shape[1]:]


@pytest.mark.timeout(600)
@pytest.mark.parametrize("family", QWEN_NAMES)
def test_acceptance_sequence(family, tmp_path):
    c, t, s1, s2, cache = (tmp_path / n for n in ("C", "T", "S1", "S2", "CACHE"))
    alignti("data", "shapes", "--out", c, "--n", 24, "--test-fraction", 0.25)
    alignti("assemble", "--random", "--family", family, "--corpus", c / "train.json", "--out", t, "--vocab-size", 300,
            "--layers", 3)
    alignti("assemble", "--random", "--family", family, "--tokenizer-from", t, "--out", s1, "--hidden", 32, "--seed", 1)
    alignti("assemble", "--random", "--family", family, "--tokenizer-from", t, "--out", s2, "--hidden", 48,
            "--layers", 3, "--seed", 2)
    ext = last_json(alignti("extract", "--teacher", t, "--data", c / "train.json", "--image-root", c, "--out", cache,
                            "--iva-layer", "auto", "--top-k", 8, "--tpa-d", 2, "--tpa-top-k", 4, "--iva-top-k", 4))
    n_train, n_test = (len(json.loads((c / f"{split}.json").read_text())) for split in ("train", "test"))
    assert ext["samples_written"] == n_train >= 16 and ext["iva_layer"] in (0, 1, 2) and ext["rejects"] == {}
    for student, out in ((s1, tmp_path / "D1"), (s2, tmp_path / "D2")):
        summary = last_json(alignti("distill", "--cache", cache, "--student", student, "--out", out, "--recipe",
                                    "alignti", "--max-steps", 2, "--batch-size", 4, "--no-progress"))
        assert summary["steps"] == 2 and set(summary["final_losses"]) == {"loss", "sft", "kd", "iva", "tpa"}
    report = alignti("eval", "--benchmark", "shapes", "--model", tmp_path / "D1" / "final", "--questions",
                     c / "test.json", "--image-root", c, "--out", tmp_path / "E1", "--batch-size", 3)
    assert f"| n_answered | {n_test} |" in report and n_test >= 4
    stats = json.loads(alignti("inspect", cache, "--json"))
    assert stats["num_samples"] == n_train and stats["iva"]["layer"] == ext["iva_layer"]
    image = Image.open(c / json.loads((c / "test.json").read_text())[0]["image"]).convert("RGB")
    hidden = []
    for out in ("D1", "D2"):
        assert generate_with_transformers(tmp_path / out / "final", image).numel() > 0
        hidden.append(json.loads((tmp_path / out / "final" / "config.json").read_text())["text_config"]["hidden_size"])
    assert hidden == [32, 48]
