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
    else:  # pickled weights holding an object only a full unpickler can build
        state = load_file(str(dst / "model.safetensors"))
        (dst / "model.safetensors").unlink()
        torch.save({**state, "payload": Path("/etc/passwd")}, dst / "pytorch_model.bin")
    (dst / "config.json").write_text(json.dumps(config))
    return dst


@pytest.mark.parametrize("kind, message", [
    ("remote-code", "needs its own Python code to load (auto_map in config.json); alignti runs it only with "
                    "--trust-remote-code"),
    ("unknown", "transformers does not know its model_type"),
    ("pickled", "its pickled weights (*.bin) are not plain tensor data and are refused; convert them to safetensors"),
])
def test_refused_in_one_line(tiny_model_dir, tmp_path, kind, message):
    model_dir = bad_copy(Path(tiny_model_dir), tmp_path / kind, kind)
    loads = [load_model] if kind == "pickled" else [load_config, load_model]
    for load in loads:
        with pytest.raises(AlignTIError) as e:
            load(model_dir)
        line = str(e.value)
        assert line.startswith(f"model directory {str(model_dir)!r}") and message in line and "\n" not in line
