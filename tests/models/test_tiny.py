"""Tiny teacher and student (Qwen2, Qwen3, Llama): save, reload with the Auto classes, same logits."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

from alignti.models.fingerprint import fingerprint_model_dir, tokenizer_compatible
from alignti.models.family import save_model_dir
from alignti.models.llava import TinySpec, build_tiny_llava
from alignti.models.tokenizer import IMAGE_TOKEN, train_tokenizer

TEXTS = ["What colour is the red circle? The answer is blue square top left.",
         "Is there a green triangle? yes no. How many objects are there? 1 2 3 4"]
PROMPT = [{"role": "user", "content": f"{IMAGE_TOKEN}\nWhat colour is the red circle?"},
          {"role": "assistant", "content": "The answer is blue."}]


def _inputs(processor) -> dict:
    g = torch.Generator().manual_seed(0)
    image = Image.fromarray(torch.randint(0, 256, (45, 30, 3), generator=g, dtype=torch.uint8).numpy())
    text = processor.apply_chat_template(PROMPT, tokenize=False)
    return processor(images=image, text=text, return_tensors="pt")


def _save_reload_logits(model, parts, out) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Logits of the in-memory model and of its reloaded copy on the same processed sample."""
    save_model_dir(model, parts, out)
    reloaded = AutoModelForImageTextToText.from_pretrained(out).eval()
    inputs = _inputs(AutoProcessor.from_pretrained(out, backend="pil"))
    with torch.no_grad():
        return model(**_inputs(parts.settings["processor"])).logits, reloaded(**inputs).logits, inputs


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "llama"])
def test_teacher_and_student_reload_identically_and_share_tokenizer(tmp_path, family):
    tokenizer = train_tokenizer(TEXTS * 4, vocab_size=300)
    teacher, t_proc = build_tiny_llava(TinySpec(text_family=family), tokenizer)
    t_logits, t_reloaded, t_inputs = _save_reload_logits(teacher, t_proc, tmp_path / "teacher")
    assert t_logits.shape == (1, t_inputs["input_ids"].shape[1], len(tokenizer))
    assert torch.equal(t_logits, t_reloaded)

    # The student reuses the teacher's saved tokenizer, as `assemble --tokenizer-from` does.
    s_tok = AutoTokenizer.from_pretrained(tmp_path / "teacher")
    spec = TinySpec(text_family=family, hidden=32, layers=1, heads=2, kv_heads=1, vision_hidden=16, seed=1)
    student, s_proc = build_tiny_llava(spec, s_tok)
    s_logits, s_reloaded, s_inputs = _save_reload_logits(student, s_proc, tmp_path / "student")
    assert torch.equal(s_logits, s_reloaded)
    assert torch.equal(t_inputs["input_ids"], s_inputs["input_ids"])  # same ids, same vision token count
    assert torch.equal(t_inputs["pixel_values"], s_inputs["pixel_values"])
    assert not torch.allclose(t_logits, s_logits)  # a different model, not a copy

    ft, fs = fingerprint_model_dir(tmp_path / "teacher"), fingerprint_model_dir(tmp_path / "student")
    assert tokenizer_compatible(ft, fs) is None
    assert ft["tokenizer"] == fs["tokenizer"] and ft["chat_template"] == fs["chat_template"]
    assert (ft["num_hidden_layers"], fs["num_hidden_layers"]) == (2, 1)
    assert ft["config"] != fs["config"] and ft["weights"] != fs["weights"]
