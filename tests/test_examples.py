"""examples/: each run file is read by the command its header names, exactly as `--config` reads it."""

from __future__ import annotations

import re
from pathlib import Path

import click
import pytest

from alignti.cli import cli
from alignti.cliargs import build, config_values
from alignti.distill.config import DistillConfig
from alignti.eval.run import EvalConfig
from alignti.extract.run import ExtractConfig
from alignti.models.assemble import AssembleConfig

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
CONFIGS = {"assemble": AssembleConfig, "distill": DistillConfig, "extract": ExtractConfig, "eval": EvalConfig}


def load(path: Path, **override) -> object:
    command = re.search(r"alignti (\w+) --config examples/" + re.escape(path.name), path.read_text()).group(1)
    cls = CONFIGS[command]
    ctx = click.Context(cli.commands[command])
    return build(cls, {**config_values(ctx, cls, str(path)), **override})


def test_every_command_of_the_recipe_has_an_example():
    names = sorted(p.name for p in EXAMPLES.glob("*.yaml"))
    assert names == ["1-assemble.yaml", "2-projector.yaml", "3-extract.yaml", "4-distill.yaml", "5-eval.yaml"]


@pytest.mark.parametrize("name", ["1-assemble.yaml", "2-projector.yaml", "3-extract.yaml", "4-distill.yaml"])
def test_example_builds_its_config(name):
    load(EXAMPLES / name)


def test_the_examples_are_the_paper_recipe(tmp_path):
    stage1, distill = load(EXAMPLES / "2-projector.yaml"), load(EXAMPLES / "4-distill.yaml")
    assert (stage1.loss.recipe, stage1.train, stage1.cache) == ("sft", "projector", None)
    assert distill.loss.weights() == {"sft": 1.0, "kd": 1.0, "iva": 1.0, "tpa": 1.0, "ground": 0.0}
    assert distill.student == stage1.out + "/final" and distill.train == "all" and distill.lr == 2e-5
    extract = load(EXAMPLES / "3-extract.yaml")
    assert distill.cache == extract.out and extract.iva_layer == "auto"
    defaults = ExtractConfig(teacher="t", data="d", image_root="i", out="o")
    assert [getattr(extract, k) for k in ("top_k", "tpa_d", "tpa_top_k", "iva_max_positions", "iva_top_k")] == [
        getattr(defaults, k) for k in ("top_k", "tpa_d", "tpa_top_k", "iva_max_positions", "iva_top_k")]
    evaluation = load(EXAMPLES / "5-eval.yaml", image_root=str(tmp_path))  # EvalConfig checks the folder exists
    assert evaluation.model == distill.out + "/final"
