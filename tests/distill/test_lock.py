"""One `alignti distill` run per --out: a second one (fresh, --resume, --overwrite) is refused in one
line while the first is live, and a killed run's lock never blocks the next."""

from __future__ import annotations

import signal
import subprocess
import time

import pytest

from alignti.distill import checkpoint as ckpt
from alignti.errors import AlignTIError
from tests.distill.worlds import distill_cli, read_log, run_world

REFUSED = ("another alignti distill run is using --out", "already exists; pass --resume")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return run_world(tmp_path_factory)


def config(world, out, **kw) -> dict:
    # 1000 epochs: far longer than the test, which kills it
    base = dict(cache=str(world.cache), student=str(world.student), out=str(out), recipe="kd", lr=1e-3,
                batch_size=2, epochs=1000, save_every=0, progress=False)
    return {**base, **kw}


def start(world, out, **kw) -> subprocess.Popen:
    return subprocess.Popen(distill_cli(**config(world, out, **kw)), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


@pytest.mark.timeout(300)
def test_second_run_on_a_live_out_is_refused(world, tmp_path):
    out = tmp_path / "out"
    pair = [start(world, out), start(world, out)]  # two fresh runs started together
    deadline = time.time() + 240
    while time.time() < deadline and all(p.poll() is None for p in pair):
        time.sleep(0.05)
    loser = next(p for p in pair if p.poll() is not None)
    winner = next(p for p in pair if p is not loser)
    while time.time() < deadline and not ((out / ckpt.LOG).is_file() and read_log(out)):
        time.sleep(0.05)  # the winner is training (its lock is held and it has written into --out)
    assert winner.poll() is None, winner.stderr.read()[-2000:]
    later = [start(world, out, resume=True), start(world, out, overwrite=True)]
    refusals = [loser.stderr.read()] + [p.communicate(timeout=240)[1] for p in later]
    assert winner.poll() is None  # still training while every other run was refused
    for p, err in zip([loser, *later], refusals):
        assert p.returncode == 2 and err.count("\n") == 1 and any(r in err for r in REFUSED), err
    assert "another alignti distill run" in refusals[1] and "another alignti distill run" in refusals[2]
    steps = [r["step"] for r in read_log(out)]
    assert steps == list(range(1, len(steps) + 1))  # one run's log, nothing interleaved or deleted
    winner.send_signal(signal.SIGKILL)
    winner.wait()
    with ckpt.lock_output_dir(out):  # the killed run's lock died with it
        with pytest.raises(AlignTIError, match="another alignti distill run is using --out"):
            ckpt.lock_output_dir(out)
    assert not list(tmp_path.glob(".*lock"))  # a released lock leaves no file beside --out
