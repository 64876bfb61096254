"""The `alignti` command line: each command maps its options to one frozen config dataclass.

No logic lives here; every command calls `run_<command>(config)` in its own module, imported
when the command runs: the configs are torch-free, so `--help` and bad options never wait for
torch or transformers. Bad configuration or input (`AlignTIError`) is one line, exit code 2.
"""

from __future__ import annotations

import json
import os
import sys

import click

from alignti.cliargs import from_dataclass
from alignti.data.shapes import ShapesConfig, run_shapes
from alignti.demo.config import DemoConfig
from alignti.distill.config import DistillConfig, PlotConfig
from alignti.errors import AlignTIError
from alignti.eval.config import EvalConfig
from alignti.extract.config import ExtractConfig, IrsConfig
from alignti.models.config import AssembleConfig
from alignti.storage.inspect import InspectConfig, run_inspect


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="alignti")
def cli() -> None:
    """Offline Align-TI distillation for multimodal LLMs (LLaVA, Qwen2-VL, Qwen2.5-VL, Qwen3-VL)."""


@cli.group()
def data() -> None:
    """Corpus tools."""


@data.command("shapes")
@from_dataclass(ShapesConfig)
def data_shapes(cfg: ShapesConfig) -> None:
    """Generate the synthetic shapes VQA corpus (same seed, same bytes)."""
    click.echo(json.dumps(run_shapes(cfg), indent=2))


@cli.command()
@from_dataclass(AssembleConfig)
def assemble(cfg: AssembleConfig) -> None:
    """Build a LLaVA model from a local LM + vision tower, or a tiny random one of any family (--random)."""
    from alignti.models.assemble import run_assemble

    click.echo(str(run_assemble(cfg)))


@cli.command()
@from_dataclass(IrsConfig)
def irs(cfg: IrsConfig) -> None:
    """Score every teacher LM layer for instruction-aware visual focus (IRS); pick l*."""
    from alignti.extract.irs import run_irs

    click.echo(json.dumps(run_irs(cfg), indent=2))


@cli.command()
@from_dataclass(ExtractConfig)
def extract(cfg: ExtractConfig) -> None:
    """Run the teacher once over a corpus and cache every Align-TI signal."""
    from alignti.extract.run import run_extract

    click.echo(json.dumps(run_extract(cfg), indent=2))


@cli.command()
@from_dataclass(DistillConfig)
def distill(cfg: DistillConfig) -> None:
    """Train a student from the teacher-signal cache (or SFT from a corpus); the teacher is never loaded."""
    from alignti.distill.train import run_distill

    summary = run_distill(cfg)  # None on every process but the main one (accelerate launch)
    if summary is not None:
        click.echo(json.dumps(summary, indent=2))


@cli.command()
@from_dataclass(PlotConfig)
def plot(cfg: PlotConfig) -> None:
    """Draw a distill run's loss terms against the step (OUT/log.jsonl -> OUT/loss.png)."""
    from alignti.distill.plot import run_plot

    click.echo(json.dumps(run_plot(cfg), indent=2))


@cli.command("eval")
@from_dataclass(EvalConfig)
def eval_(cfg: EvalConfig) -> None:
    """Answer a benchmark with a model (resumable) and score it, or compare runs with --report DIR..."""
    from alignti.eval.run import run_eval

    run_eval(cfg)


@cli.command()
@from_dataclass(InspectConfig)
def inspect(cfg: InspectConfig) -> None:
    """Cache statistics: samples, rejects, bytes per signal and per response token, retained mass, IRS."""
    run_inspect(cfg)


@cli.command()
@from_dataclass(DemoConfig)
def demo(cfg: DemoConfig) -> None:
    """The whole pipeline on the built-in shapes corpus, CPU only: teacher, cache, two students x 3 recipes, eval."""
    from alignti.demo.run import run_demo

    run_demo(cfg)


def main() -> None:
    """Console entry point: one-line errors with exit code 2 for bad input."""
    # transformers' per-load progress bars and backend-fallback notices drown our own progress; set
    # before transformers is imported (it reads both then), and inherited by worker processes.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        cli.main(standalone_mode=False)
    except AlignTIError as exc:
        click.echo(f"alignti: error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.exceptions.NoArgsIsHelpError as exc:  # a bare group (`alignti data`): its help
        exc.show()
        sys.exit(exc.exit_code)
    except click.UsageError as exc:  # bad choice, not a number, missing option: one line like ours
        names, ctx = [], exc.ctx
        while ctx is not None and ctx.parent is not None:  # the subcommand's path, without the program name
            names, ctx = [ctx.info_name, *names], ctx.parent
        click.echo(f"alignti: error: {' '.join(names) + ': ' if names else ''}{exc.format_message()}", err=True)
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
