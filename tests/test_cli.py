"""Every command is listed and has --help; bad input is one line with exit code 2."""

import subprocess
import sys

import pytest
from click.testing import CliRunner

from alignti.cli import cli
from alignti.errors import AlignTIError

COMMANDS = ["assemble", "data", "demo", "distill", "eval", "extract", "inspect", "irs", "plot"]


def test_help_lists_every_command():
    out = CliRunner().invoke(cli, ["--help"]).output
    listed = [line.split()[0] for line in out.split("Commands:")[1].strip().splitlines()]
    assert listed == COMMANDS


@pytest.mark.parametrize("args", [[c] for c in COMMANDS if c != "data"] + [["data", "shapes"]])
def test_every_command_has_help(args):
    res = CliRunner().invoke(cli, [*args, "--help"])
    assert res.exit_code == 0 and "Usage:" in res.output and len(res.output) > 200


def test_bad_input_is_one_line_exit_2(tmp_path):
    res = subprocess.run([sys.executable, "-c", "from alignti.cli import main; main()", "inspect",
                          str(tmp_path / "missing")], capture_output=True, text=True)
    assert res.returncode == 2
    assert res.stderr.startswith("alignti: error:") and res.stderr.count("\n") == 1


@pytest.mark.parametrize("args", [["data", "shapes"], ["eval", "--benchmark", "gqa", "--questions", "q.jsonl"]])
def test_missing_required_option_is_refused_before_the_command_runs(args):
    # A dataclass field without a default is a required option: it may come from --config FILE, so
    # `cliargs.build` checks it after the merge (one line, exit 2 under `main`), never passing None on.
    with pytest.raises(AlignTIError, match="missing --out"):
        CliRunner().invoke(cli, args, standalone_mode=False, catch_exceptions=False)


def run_main(monkeypatch, capsys, *argv: str) -> tuple[int, str]:
    """`alignti ARGV` through the console entry point, in-process: (exit code, stderr)."""
    from alignti.cli import main

    monkeypatch.setattr(sys, "argv", ["alignti", *argv])
    with pytest.raises(SystemExit) as exit_info:
        main()
    return exit_info.value.code, capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["data", "shapes"], "missing --out (on the command line or in --config FILE)"),  # cliargs.build
    (["distill", "--recipe", "x", "--student", "s", "--out", "o"],
     "distill: Invalid value for '--recipe': 'x' is not one of 'sft', 'kd', 'alignti'."),
    (["extract", "--top-k", "abc"], "extract: Invalid value for '--top-k': 'abc' is not a valid integer."),
    (["irs", "--teacher", "t", "--data", "d"], "missing --image-root (on the command line or in --config FILE)"),
    (["nosuch"], "No such command 'nosuch'."),
])
def test_click_usage_errors_are_one_line(monkeypatch, capsys, argv, message):
    code, err = run_main(monkeypatch, capsys, *argv)
    assert code == 2 and err == f"alignti: error: {message}\n"


BAD_VALUES = [  # (command, bad options, what the one line names); run with valid paths for everything else
    ("extract", ["--chunk-size", "0"], "must be >= 1: --chunk-size 0"),
    ("extract", ["--iva-max-positions", "-3"], "must be >= 1: --iva-max-positions -3"),
    ("extract", ["--tpa-max-positions", "-1"], "must be >= 1: --tpa-max-positions -1"),
    ("extract", ["--limit", "-5"], "must be >= 1: --limit -5"),
    ("extract", ["--irs-samples", "1"], "must be >= 2: --irs-samples 1"),
    ("extract", ["--device", "bogus"], "--device must be auto, cpu, cuda or cuda:N, got 'bogus'"),
    ("extract", ["--dtype", "fp64"], "--dtype must be one of"),
    ("extract", ["--retry-rejects"], "--retry-rejects retries the rejects of the cache being resumed"),
    ("irs", ["--device", "bogus"], "--device must be auto, cpu, cuda or cuda:N, got 'bogus'"),
    ("irs", ["--batch-size", "0"], "must be >= 1: --batch-size 0"),
    ("irs", ["--out", "{dir}"], "must be a file path, not a directory"),
    ("eval", ["--out", "{file}"], "exists and is not a directory"),
    ("eval", ["--device", "gpu"], "--device must be auto, cpu, cuda or cuda:N"),
    ("inspect", ["--mass-samples", "-1"], "must be >= 0: --mass-samples -1"),
    ("inspect", ["bogus://x/y"], "cannot open bogus://x/y: Protocol not known: bogus"),
    ("distill", ["--seed", "-1"], "must be >= 0: --seed -1"),
    ("distill", ["--device", "cuda:1"], "--device must be auto, cpu or cuda (pick GPUs with CUDA_VISIBLE_DEVICES)"),
    ("distill", ["--weight-decay", "nan"], "--weight-decay (finite) and --max-grad-norm must be >= 0"),
]


@pytest.mark.parametrize("command, bad, message", BAD_VALUES, ids=[f"{c} {' '.join(b)}" for c, b, _ in BAD_VALUES])
def test_bad_values_are_one_line_before_any_work(monkeypatch, capsys, tmp_path, command, bad, message):
    (tmp_path / "images").mkdir()
    (tmp_path / "corpus.json").write_text("[]")
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "a-dir").mkdir()
    given = [b.format(dir=tmp_path / "a-dir", file=tmp_path / "a-file") for b in bad]
    teacher, data, images = str(tmp_path / "no-model"), str(tmp_path / "corpus.json"), str(tmp_path / "images")
    base = {
        "extract": ["--teacher", teacher, "--data", data, "--image-root", images, "--out", str(tmp_path / "c")],
        "irs": ["--teacher", teacher, "--data", data, "--image-root", images, "--out", str(tmp_path / "irs.json")],
        "eval": ["--benchmark", "shapes", "--questions", data, "--model", teacher, "--out", str(tmp_path / "e")],
        "inspect": [] if given[0].startswith("bogus") else [str(tmp_path / "c")],
        "distill": ["--student", teacher, "--data", data, "--recipe", "sft", "--out", str(tmp_path / "d")],
    }[command]
    before = sorted(tmp_path.rglob("*"))
    code, err = run_main(monkeypatch, capsys, command, *base, *given)
    assert code == 2 and err.count("\n") == 1 and err.startswith("alignti: error: ") and message in err, err
    assert sorted(tmp_path.rglob("*")) == before  # nothing created


def test_importing_the_cli_loads_no_model_library():
    """`--help` and option errors must not wait for torch / transformers (a fresh interpreter:
    this one has them loaded already)."""
    code = "import sys, alignti.cli; print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'transformers'}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
