"""`--config FILE` (cliargs): run files merge under the flags, unknown names are refused, required
options may come from the file, and a written run file reads back to the same config."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass, field

import click
import pytest
from click.testing import CliRunner

from alignti.cliargs import build, from_dataclass, options, read_run_file, write_run_file
from alignti.errors import AlignTIError


@dataclass(frozen=True)
class Inner:
    kd_weight: float = field(default=1.0, metadata={"help": "a nested option"})


@dataclass(frozen=True)
class Toy:
    out: str = field(metadata={"help": "required"})
    lr: float = field(default=2e-5, metadata={"help": "a float"})
    steps: int | None = field(default=None, metadata={"help": "optional int"})
    mode: str = field(default="a", metadata={"help": "a choice", "choices": ("a", "b")})
    fast: bool = field(default=False, metadata={"help": "a switch"})
    tags: list[str] = field(default_factory=list, metadata={"help": "repeatable"})
    inner: Inner = field(default_factory=Inner)


@click.command()
@from_dataclass(Toy)
def toy(cfg: Toy) -> None:
    click.echo(repr(cfg))


def run(*args: str) -> Toy:
    res = CliRunner().invoke(toy, list(args), standalone_mode=False, catch_exceptions=False)
    return eval(res.output.strip())  # noqa: S307 - our own repr


def test_file_values_are_converted_and_flags_override(tmp_path):
    f = tmp_path / "run.yaml"
    # YAML reads 2e-5 as a string and 3 as an int: both go through the option's own type
    f.write_text("out: o\nlr: 2e-5\nkd-weight: 3\nmode: b\nfast: true\ntags: [x, y]\nsteps: 7\n")
    assert run("--config", str(f)) == Toy(out="o", lr=2e-5, steps=7, mode="b", fast=True, tags=["x", "y"],
                                          inner=Inner(kd_weight=3.0))
    # a flag given on the command line wins, even when it equals the dataclass default
    got = run("--config", str(f), "--lr", "0.1", "--mode", "a", "--no-fast", "--kd-weight", "1.0", "--out", "p")
    assert (got.lr, got.mode, got.fast, got.inner.kd_weight, got.out, got.steps) == (0.1, "a", False, 1.0, "p", 7)


def test_toml_and_required_from_the_file(tmp_path):
    f = tmp_path / "run.toml"
    f.write_text('out = "o"\nkd_weight = 0.5\ntags = "one"\n')
    assert run("--config", str(f)) == Toy(out="o", tags=["one"], inner=Inner(kd_weight=0.5))


@pytest.mark.parametrize("text,message", [
    ("out: o\nbogus-key: 1\n", "unknown option(s): --bogus-key"),
    ("out: o\nmode: c\n", "--mode"),
    ("out: o\nlr: fast\n", "--lr"),
    ("- out\n", "must map option names"),
    ("out: o\nkd_weight: 1\nkd-weight: 2\n", "given twice"),
    ("out: [unclosed\n", "not valid YAML"),
    ("lr: 0.1\n", "missing --out"),
])
def test_bad_run_files_are_one_error_naming_the_problem(tmp_path, text, message):
    f = tmp_path / "run.yaml"
    f.write_text(text)
    with pytest.raises(AlignTIError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        CliRunner().invoke(toy, ["--config", str(f)], standalone_mode=False, catch_exceptions=False)


def test_written_run_file_reads_back_to_the_same_config(tmp_path):
    cfg = Toy(out="o", lr=3e-4, steps=None, mode="b", fast=True, tags=["x"], inner=Inner(kd_weight=0.25))
    path = write_run_file(cfg, tmp_path / "sub" / "toy.yaml", "toy")
    text = path.read_text()
    assert text.startswith("# alignti toy:") and f"alignti toy --config {path}" in text
    assert read_run_file(path) == options(cfg)
    assert run("--config", str(path)) == cfg
    assert build(Toy, read_run_file(path)) == cfg


def test_cli_unknown_key_and_missing_required_are_one_line_exit_2(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("student: s\nout: o\ncache: c\nkd-weigth: 1\n")
    for args, named in ((["distill", "--config", str(f)], "--kd-weigth"), (["distill", "--cache", "c"], "--student"),
                        (["inspect"], "CACHE")):
        res = subprocess.run([sys.executable, "-c", "from alignti.cli import main; main()", *args],
                             capture_output=True, text=True)
        assert res.returncode == 2, res.stderr
        assert res.stderr.startswith("alignti: error:") and res.stderr.count("\n") == 1, res.stderr
        assert named in res.stderr
