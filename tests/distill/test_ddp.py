"""Two CPU processes under `accelerate launch` (DDP, gloo) equal one process with twice the accumulation.

Note: in accelerate 1.x `accelerate launch --cpu --num_processes 2` starts ONE process (the
`--cpu` path is the single-process launcher unless MPI is configured). `--multi_gpu` on a
machine without GPUs runs torchrun with 2 processes, and `Accelerator(cpu=True)` then forms a
gloo process group, which is what this test uses. Run on the LLaVA world and on Qwen2.5-VL (the
family adapter's positions and images under DDP).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch

from tests.distill.worlds import cli_summary, distill_cli, read_log, run_world, weights
from tests.helpers.families import family_world

# world -> (batch size, epochs, optimizer steps): 24 samples in 5 micro-batches of 5 / 16 in 3 of 6 per
# epoch, 2 per step, so the last step of each epoch has one micro-batch and the second process runs a
# zero-weighted one (live=False)
PLANS = {"llava": (5, 2, 6), "qwen2_5_vl": (6, 1, 2)}


@pytest.fixture(scope="module", params=sorted(PLANS))
def world(request, tmp_path_factory):
    if request.param == "llava":
        return run_world(tmp_path_factory), PLANS["llava"]
    return family_world(tmp_path_factory, request.param), PLANS[request.param]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def summary_of(done: subprocess.CompletedProcess) -> dict:
    assert done.returncode == 0, done.stderr[-4000:]
    return cli_summary(done.stdout)


@pytest.mark.timeout(400)
def test_two_processes_equal_one_with_double_accumulation(world, tmp_path):
    world, (batch_size, epochs, steps) = world
    base = dict(cache=str(world.cache), student=str(world.student), recipe="alignti", lr=2e-3, warmup_steps=1,
                batch_size=batch_size, epochs=epochs, save_every=0, progress=False, device="cpu", seed=3)
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    one_cfg = dict(base, out=str(tmp_path / "one"), grad_accum=2)
    one = summary_of(subprocess.run(distill_cli(**one_cfg), env=env, capture_output=True, text=True, timeout=300))
    two_cfg = dict(base, out=str(tmp_path / "two"), grad_accum=1)
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", str(free_port()), *distill_cli(**two_cfg)[2:]]  # -m alignti distill ...
    two = summary_of(subprocess.run(launch, env=env, capture_output=True, text=True, timeout=300))
    assert one["processes"] == 1 and two["processes"] == 2
    assert one["steps"] == two["steps"] == steps
    log1, log2 = read_log(tmp_path / "one"), read_log(tmp_path / "two")
    for a, b in zip(log1, log2, strict=True):
        assert a["tokens"] == b["tokens"]
        # the gradient itself (DDP averages over processes; the loss is scaled to undo it)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4), a["step"]
        for term in ("loss", "sft", "kd", "iva", "tpa"):
            assert b[term] == pytest.approx(a[term], rel=1e-4, abs=1e-6), (a["step"], term)
    w1, w2 = weights(tmp_path / "one" / "final"), weights(tmp_path / "two" / "final")
    start = weights(world.student)
    assert w1.keys() == w2.keys()
    moved = 0
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-6, msg=k)
        moved += not torch.equal(w1[k], start[k])
    assert moved > 10  # training really changed the weights being compared
