"""Model directories we must not run are refused in one line saying what to do, not with a
transformers traceback: code of its own without trust_remote_code, an unknown architecture,
pickled weights that are not plain tensor data."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from alignti.errors import AlignTIError
from alignti.models.loading import load_config, load_model


def bad_copy(src: Path, dst: Path, kind: str) -> Path:
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    if kind == "remote-code":
        config.update(model_type="my-llava", auto_map={"AutoConfig": "my_code.MyConfig",
                                                       "AutoModelForImageTextToText": "my_code.MyModel"})
    elif kind == "unknown":
        config.update(model_type="no-such-architecture")
    elif kind == "truncated":  # an interrupted copy
        with open(dst / "model.safetensors", "r+b") as f:
            f.truncate(100)
    else:  # pickled weights: plain tensors, or with an object only a full unpickler can build
        state = load_file(str(dst / "model.safetensors"))
        (dst / "model.safetensors").unlink()
        torch.save({**state, "payload": Path("/etc/passwd")} if kind == "pickled-object" else state,
                   dst / "pytorch_model.bin")
    (dst / "config.json").write_text(json.dumps(config))
    return dst


@pytest.mark.parametrize("kind, message", [
    ("remote-code", "needs its own Python code to load (auto_map in config.json); alignti runs it only with "
                    "--trust-remote-code"),
    ("unknown", "transformers does not know its model_type"),
    ("truncated", "its safetensors weights cannot be read (Error while deserializing header"),
    ("pickled-object", "has no safetensors weights; pickled *.bin weights are refused: convert them to safetensors"),
    ("pickled", "has no safetensors weights; pickled *.bin weights are refused: convert them to safetensors"),
])
def test_refused_in_one_line(tiny_model_dir, tmp_path, kind, message):
    model_dir = bad_copy(Path(tiny_model_dir), tmp_path / kind, kind)
    loads = [load_model] if kind.startswith("pickled") or kind == "truncated" else [load_config, load_model]
    for load in loads:
        with pytest.raises(AlignTIError) as e:
            load(model_dir)
        line = str(e.value)
        assert line.startswith(f"model directory {str(model_dir)!r}") and message in line and "\n" not in line


def test_a_student_with_code_of_its_own_is_never_asked_about_nor_run(tiny_model_dir, tmp_path, monkeypatch):
    """On a terminal transformers asks whether to run a directory's code (and runs it on "y") when a
    load leaves trust_remote_code unset; the fingerprint's tokenizer load (distill --student) said
    nothing. Every load of ours says no up front: nobody is asked, nothing runs (the model load then
    refuses the directory in one line, test_refused_in_one_line)."""
    from alignti.models.fingerprint import fingerprint_model_dir

    model_dir = bad_copy(Path(tiny_model_dir), tmp_path / "student", "remote-code")
    (model_dir / "my_code.py").write_text("raise SystemExit('the directory code ran')\n")
    asked = []
    monkeypatch.setattr("builtins.input", lambda *a: asked.append(a) or "y")
    fingerprint_model_dir(model_dir)  # my_code.py would raise SystemExit
    assert not asked
