"""Two CPU processes under `accelerate launch` with the shipped configs (examples/accelerate/: DDP,
and FSDP through our own `fully_shard`, gloo) equal one process with twice the accumulation; the
FSDP run checkpoints, resumes bit for bit and saves a student the Auto classes load.

Note: in accelerate 1.x `accelerate launch --cpu --num_processes 2` starts ONE process (the
`--cpu` path is the single-process launcher unless MPI is configured). A multi-GPU or FSDP config
on a machine without GPUs runs torchrun with 2 processes, and `Accelerator(cpu=True)` then forms a
gloo process group, which is what these tests use. DDP runs on the LLaVA world and on Qwen2.5-VL
(the family adapter's positions and images under DDP); FSDP on the LLaVA world.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText

from alignti.distill import sharding, train
from alignti.errors import AlignTIError
from tests.distill.worlds import cli_summary, distill_cli, distill_config, generate_once, read_log, run_world, weights
from tests.helpers.families import family_world

CONFIGS = Path(__file__).resolve().parents[2] / "examples" / "accelerate"
ENV = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
TIMING = {"tokens_per_second", "elapsed"}
# world -> (batch size, epochs, optimizer steps): 24 samples in 5 micro-batches of 5 / 16 in 3 of 6 per
# epoch, 2 per step, so the last step of each epoch has one micro-batch and the second process runs a
# zero-weighted one (live=False)
PLANS = {"llava": (5, 2, 6), "qwen2_5_vl": (6, 1, 2)}


@pytest.fixture(scope="module", params=sorted(PLANS))
def world(request, tmp_path_factory):
    if request.param == "llava":
        return request.param, run_world(tmp_path_factory), PLANS["llava"]
    return request.param, family_world(tmp_path_factory, request.param), PLANS[request.param]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def summary_of(done: subprocess.CompletedProcess) -> dict:
    assert done.returncode == 0, done.stderr[-4000:]
    return cli_summary(done.stdout)


def base(world) -> dict:
    _, w, (batch_size, epochs, _) = world
    return dict(cache=str(w.cache), student=str(w.student), recipe="alignti", lr=2e-3, warmup_steps=1,
                batch_size=batch_size, epochs=epochs, save_every=0, progress=False, device="cpu", seed=3)


def launch(config: str, **options) -> dict:
    """`accelerate launch --config_file examples/accelerate/<config> --num_processes 2 -m alignti distill ...`"""
    argv = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / config),
            "--num_processes", "2", "--main_process_port", str(free_port()), *distill_cli(**options)[2:]]
    return summary_of(subprocess.run(argv, env=ENV, capture_output=True, text=True, timeout=300))


@pytest.fixture(scope="module")
def one_process(world, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one-process") / "one"
    one = summary_of(subprocess.run(distill_cli(**base(world), out=str(out), grad_accum=2), env=ENV,
                                    capture_output=True, text=True, timeout=300))
    assert one["processes"] == 1 and one["steps"] == world[2][2]
    return out


def assert_equal_within_fp32(one: Path, two: Path, start: dict) -> None:
    for a, b in zip(read_log(one), read_log(two), strict=True):
        assert a["tokens"] == b["tokens"]
        # the gradient itself (DDP and FSDP average over processes; the loss is scaled to undo it)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4), a["step"]
        for term in ("loss", "sft", "kd", "iva", "tpa"):
            assert b[term] == pytest.approx(a[term], rel=1e-4, abs=1e-6), (a["step"], term)
    w1, w2 = weights(one / "final"), weights(two / "final")
    assert w1.keys() == w2.keys()
    moved = 0
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-6, msg=k)
        moved += not torch.equal(w1[k], start[k])
    assert moved > 10  # training really changed the weights being compared


@pytest.mark.timeout(400)
def test_two_ddp_processes_equal_one_with_double_accumulation(world, one_process, tmp_path):
    two = launch("ddp.yaml", **base(world), out=str(tmp_path / "two"), num_workers=1)
    assert two["processes"] == 2 and two["steps"] == world[2][2]
    assert_equal_within_fp32(one_process, tmp_path / "two", weights(world[1].student))


@pytest.mark.timeout(600)
def test_fsdp_trains_like_one_process_checkpoints_resumes_and_saves(world, one_process, tmp_path):
    if world[0] != "llava":
        pytest.skip("FSDP wraps the decoder layers whatever the family: checked on the LLaVA world")
    world = world[1]
    out = tmp_path / "fsdp"
    options = dict(base(("llava", world, PLANS["llava"])), out=str(out), save_every=3, keep_checkpoints=0)
    two = launch("fsdp.yaml", **options)
    assert two["processes"] == 2 and two["steps"] == 6
    assert_equal_within_fp32(one_process, out, weights(world.student))
    # the checkpoint holds full tensors: the trainable weights and a name-keyed optimizer state
    ckpt = out / "checkpoints" / "step-3"
    assert json.loads((ckpt / "state.json").read_text())["fsdp"] is True
    shapes = {n: p.shape for n, p in AutoModelForImageTextToText.from_pretrained(world.student).named_parameters()}
    trainable = load_file(str(ckpt / "trainable.safetensors"))
    assert len(trainable) > 10 and all(v.shape == shapes[k] for k, v in trainable.items())
    optim = torch.load(ckpt / "optimizer.pt", weights_only=True)
    assert {n.removeprefix("model.") for n in optim["state"]} == set(trainable)  # Objective.model.<name>
    assert all(st["exp_avg"].shape == shapes[n.removeprefix("model.")] for n, st in optim["state"].items())
    assert generate_once(out / "final", world).numel() > 0  # the Auto classes load the saved student
    # resume from step 3 (the run's own output directory, its final student moved away): bit-identical
    ref = tmp_path / "uninterrupted"
    ref.mkdir()
    shutil.move(out / "final", ref / "final")
    shutil.copy(out / "log.jsonl", ref / "log.jsonl")
    shutil.rmtree(out / "checkpoints" / "step-6", ignore_errors=True)
    resumed = launch("fsdp.yaml", **options, resume=True)
    assert resumed["resumed_from"].endswith("step-3") and resumed["steps_this_run"] == 3
    strip = lambda log: [{k: v for k, v in r.items() if k not in TIMING} for r in log]  # noqa: E731
    assert strip(read_log(out)) == strip(read_log(ref))
    a, b = weights(ref / "final"), weights(out / "final")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_launch_settings_refuse_what_the_loop_does_not_do(world, tmp_path, monkeypatch):
    if world[0] != "llava":
        pytest.skip("family-independent")
    fsdp = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}
    assert sharding.launch_sharding({}) is None
    assert sharding.launch_sharding(fsdp) == sharding.FsdpSettings(reshard_after_forward=True)
    assert sharding.launch_sharding({**fsdp, "FSDP_RESHARD_AFTER_FORWARD": "false"}).reshard_after_forward is False
    for env, match in (({"ACCELERATE_USE_DEEPSPEED": "true"}, "DeepSpeed is not supported"),
                       ({"ACCELERATE_USE_FSDP": "true"}, "fsdp_version: 2"),
                       ({**fsdp, "FSDP_OFFLOAD_PARAMS": "true"}, "offload"),
                       ({**fsdp, "FSDP_ACTIVATION_CHECKPOINTING": "true"}, "--gradient-checkpointing"),
                       ({**fsdp, "FSDP_RESHARD_AFTER_FORWARD": "SHARD_GRAD_OP"}, "true or false")):
        with pytest.raises(AlignTIError, match=match):
            sharding.launch_sharding(env)
    # a DeepSpeed launch stops before anything is read or written
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(AlignTIError, match="DeepSpeed"):
        train.run_distill(distill_config(**base(world), out=str(tmp_path / "ds")))
    assert not (tmp_path / "ds").exists()
