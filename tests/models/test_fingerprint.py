"""Model fingerprint: stable across save/reload, restarts and sharding; each hash moves alone."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import AutoModelForImageTextToText, AutoProcessor

from alignti.errors import AlignTIError
from alignti.models.fingerprint import fingerprint_model_dir, tokenizer_compatible
from alignti.models.family import load_parts, save_model_dir
from alignti.models.llava import TinySpec, build_tiny_llava
from alignti.models.tokenizer import IMAGE_TOKEN, train_tokenizer

SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    tokenizer = train_tokenizer(["a red circle and a blue square", "how many triangles are there"] * 4, 300)
    model, processor = build_tiny_llava(TinySpec(text_family="llama"), tokenizer)
    return save_model_dir(model, processor, tmp_path_factory.mktemp("fp") / "model")


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _changed(a: dict, b: dict) -> set[str]:
    return {k for k in a if a[k] != b[k]}


def _reference_weights_hash(path) -> str:
    """The documented weights hash, recomputed from loaded tensors instead of raw file ranges."""
    lines = []
    for name, t in sorted(load_file(path).items()):
        head = json.dumps([name, SAFETENSORS_DTYPES[t.dtype], list(t.shape)], separators=(",", ":")).encode()
        lines.append(f"{name}\t{hashlib.sha256(head + t.contiguous().numpy().tobytes()).hexdigest()}\n")
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def _write_reversed(tensors: dict[str, torch.Tensor], path) -> None:
    """A valid safetensors file with the tensors laid out in reverse name order.

    (`save_file` always sorts them, so it cannot produce another layout.)
    """
    header, blobs, offset = {}, [], 0
    for name in sorted(tensors, reverse=True):
        t = tensors[name]
        blob = t.contiguous().numpy().tobytes()
        header[name] = {"dtype": SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    path.write_bytes(struct.pack("<Q", len(head)) + head + b"".join(blobs))


def test_values(model_dir):
    fp = fingerprint_model_dir(model_dir)
    for key in ("config", "weights", "tokenizer", "chat_template", "processor"):
        assert len(fp[key]) == 64 and int(fp[key], 16) >= 0, key
    assert fp["weights"] == _reference_weights_hash(model_dir / "model.safetensors")
    processor = AutoProcessor.from_pretrained(model_dir, backend="pil")
    config = json.loads((model_dir / "config.json").read_text())
    assert fp["vocab_size"] == config["text_config"]["vocab_size"] == fp["tokenizer_size"] == len(processor.tokenizer)
    assert fp["num_hidden_layers"] == 2
    ids = processor(images=Image.new("RGB", (50, 20)), text=IMAGE_TOKEN, return_tensors="pt")["input_ids"]
    assert fp["n_vision_tokens"] == int((ids == processor.image_token_id).sum()) == 16


def test_stable_across_reload_resave_and_restart(model_dir, tmp_path):
    fp = fingerprint_model_dir(model_dir)
    assert fingerprint_model_dir(model_dir) == fp
    model = AutoModelForImageTextToText.from_pretrained(model_dir)
    assert fingerprint_model_dir(save_model_dir(model, load_parts(model_dir), tmp_path / "resaved")) == fp
    code = ("import json, sys; from alignti.models.fingerprint import fingerprint_model_dir; "
            "print(json.dumps(fingerprint_model_dir(sys.argv[1])))")
    run = subprocess.run([sys.executable, "-c", code, str(model_dir)], capture_output=True, text=True, check=True,
                         env={"HF_HUB_OFFLINE": "1", "PYTHONHASHSEED": "123", "PATH": "",
                              **{k: os.environ[k] for k in ("PYTHONPATH",) if k in os.environ}})
    assert json.loads(run.stdout.strip().splitlines()[-1]) == fp


def test_weights_hash_ignores_sharding_and_tensor_order(model_dir, tmp_path):
    fp = fingerprint_model_dir(model_dir)
    model = AutoModelForImageTextToText.from_pretrained(model_dir)
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, max_shard_size="100KB")
    assert len(list(sharded.glob("*.safetensors"))) > 1 and (sharded / "model.safetensors.index.json").is_file()
    assert fingerprint_model_dir(sharded)["weights"] == fp["weights"]

    shuffled = _copy(model_dir, tmp_path / "shuffled")
    tensors = load_file(model_dir / "model.safetensors")
    _write_reversed(tensors, shuffled / "model.safetensors")
    assert (shuffled / "model.safetensors").read_bytes() != (model_dir / "model.safetensors").read_bytes()
    reread = load_file(shuffled / "model.safetensors")
    assert reread.keys() == tensors.keys() and all(torch.equal(reread[k], v) for k, v in tensors.items())
    assert fingerprint_model_dir(shuffled) == fp


def test_one_weight_changes_weights_only(model_dir, tmp_path):
    fp = fingerprint_model_dir(model_dir)
    changed = _copy(model_dir, tmp_path / "changed")
    tensors = load_file(model_dir / "model.safetensors")
    name = sorted(tensors)[len(tensors) // 2]
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] += 1e-3
    save_file(tensors, changed / "model.safetensors", metadata={"format": "pt"})
    assert _changed(fp, fingerprint_model_dir(changed)) == {"weights"}

    dtype = _copy(model_dir, tmp_path / "bf16")  # same values, another dtype: still weights only
    save_file({k: v.to(torch.bfloat16) for k, v in load_file(model_dir / "model.safetensors").items()},
              dtype / "model.safetensors", metadata={"format": "pt"})
    assert _changed(fp, fingerprint_model_dir(dtype)) == {"weights"}


def test_chat_template_changes_chat_template_only(model_dir, tmp_path):
    fp = fingerprint_model_dir(model_dir)
    changed = _copy(model_dir, tmp_path / "template")
    path = changed / "chat_template.jinja"
    path.write_text(path.read_text() + "{{ '' }}")
    fp2 = fingerprint_model_dir(changed)
    assert _changed(fp, fp2) == {"chat_template"}
    assert tokenizer_compatible(fp, fp2) == "chat_template"
    assert tokenizer_compatible(fp, fp) is None


def test_processor_and_config_changes_are_their_own(model_dir, tmp_path):
    fp = fingerprint_model_dir(model_dir)
    proc = _copy(model_dir, tmp_path / "proc")
    cfg = json.loads((proc / "processor_config.json").read_text())
    cfg["image_processor"]["image_mean"] = [0.4, 0.4, 0.4]
    (proc / "processor_config.json").write_text(json.dumps(cfg))
    assert _changed(fp, fingerprint_model_dir(proc)) == {"processor"}

    conf = _copy(model_dir, tmp_path / "conf")
    cfg = json.loads((conf / "config.json").read_text())
    cfg["text_config"]["rms_norm_eps"] = 1e-5
    cfg["transformers_version"] = "0.0.1"  # volatile: ignored
    (conf / "config.json").write_text(json.dumps(cfg, indent=4))
    assert _changed(fp, fingerprint_model_dir(conf)) == {"config"}


def test_other_tokenizer_is_incompatible(model_dir, tmp_path):
    fp = fingerprint_model_dir(model_dir)
    tokenizer = train_tokenizer(["completely different words here", "zebra xylophone quartz"] * 4, 300)
    other_model, other_proc = build_tiny_llava(TinySpec(text_family="llama"), tokenizer)
    fp2 = fingerprint_model_dir(save_model_dir(other_model, other_proc, tmp_path / "other"))
    assert fp2["tokenizer"] != fp["tokenizer"] and fp2["chat_template"] == fp["chat_template"]
    assert tokenizer_compatible(fp, fp2) == "tokenizer"


def test_bad_directories(model_dir, tmp_path):
    with pytest.raises(AlignTIError):
        fingerprint_model_dir(tmp_path / "nothing")
    truncated = _copy(model_dir, tmp_path / "truncated")
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) - 100])
    with pytest.raises(AlignTIError, match="truncated"):
        fingerprint_model_dir(truncated)
    (truncated / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(AlignTIError):
        fingerprint_model_dir(truncated)
    (truncated / "model.safetensors").unlink()
    with pytest.raises(AlignTIError, match="no safetensors"):
        fingerprint_model_dir(truncated)
