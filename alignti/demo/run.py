"""`alignti demo`: the whole product on the built-in shapes corpus, on a laptop CPU.

Reads top to bottom as the run: corpus -> teacher and two student sizes (tiny random LLaVA
models sharing one tokenizer) -> teacher SFT until competent -> IRS + extract once -> both
student sizes distilled from that one cache with sft, kd and alignti -> every model evaluated on
the held-out split -> saliency pictures -> report.md / report.json and a printed table.
"""

from __future__ import annotations

import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from transformers.utils import logging as hf_logging

from alignti.cliargs import build
from alignti.data.shapes import ShapesConfig, run_shapes
from alignti.demo.config import DemoConfig
from alignti.demo.parallel import run_many
from alignti.demo.report import write_report
from alignti.demo.saliency import saliency_pictures
from alignti.demo.tower import copy_tower, pretrain_demo_tower
from alignti.distill.config import DistillConfig
from alignti.distill.train import run_distill
from alignti.errors import AlignTIError
from alignti.eval.run import EvalConfig, run_eval
from alignti.extract.irs import IrsConfig, run_irs
from alignti.extract.run import ExtractConfig, run_extract
from alignti.models.assemble import AssembleConfig, run_assemble
from alignti.models.fingerprint import fingerprint_model_dir

MARKER = ".alignti-demo"
RECIPES = ("sft", "kd", "alignti")
TEACHER_RECIPE = "sft + grounding"  # SFT with the grounding term (distill/grounding.py)
GROUND_LAYER = 1


@dataclass(frozen=True)
class DemoPlan:
    """Sizes and budgets of one demo run (see DEFAULT and QUICK)."""

    n: int  # shapes records (train + test)
    teacher: dict  # AssembleConfig size fields
    students: dict[str, dict]  # name -> AssembleConfig size fields
    tower_steps: int  # vision-tower pretraining (demo/tower.py)
    teacher_steps: int
    teacher_lr: float
    ground_weight: float  # teacher SFT's grounding term (distill/grounding.py)
    student_steps: int
    student_lr: float
    batch_size: int
    irs_samples: int
    pictures: int


# Calibrated on the 2-core CPU (docs/results.md). From scratch, these models learn to read the
# image far too slowly for a laptop (about 40% held-out after 4 minutes, chance is 30%); with the
# vision tower pretrained on the corpus's per-patch object labels first, the same teacher answers
# colour, shape and count questions almost perfectly within about 2,000 steps. Patch 32 gives one
# vision token per image quadrant (each holds at most one object), the fastest layout to learn.
# Trained on answers alone the teacher reads the image as a bag of objects, its instruction-to-
# vision attention nearly uniform; IVA presumes a teacher that looks where it is asked, as large
# pretrained VLMs do, so its SFT adds the grounding term on the corpus's object boxes (layer 1).
# Students get 1,500 steps, the most that keeps the default run under 10 minutes: at 1,000 no
# recipe is separable over five seeds, at 2,500 IVA's gain shows (docs/results.md).
_VISION = dict(vision_hidden=64, vision_layers=2, image_size=64, patch=32, vocab_size=512)
DEFAULT = DemoPlan(
    n=5000, teacher=dict(hidden=128, layers=4, heads=4, kv_heads=2, **_VISION),
    students={"student-s": dict(hidden=64, layers=2, heads=4, kv_heads=2, **_VISION),
              "student-m": dict(hidden=96, layers=3, heads=4, kv_heads=2, **_VISION)},
    tower_steps=2500, teacher_steps=3000, teacher_lr=4e-4, ground_weight=0.3,
    student_steps=1500, student_lr=4e-4, batch_size=16,
    irs_samples=128, pictures=6)
QUICK = DemoPlan(
    n=1500, teacher=dict(hidden=96, layers=3, heads=4, kv_heads=2, **_VISION),
    students={"student-s": dict(hidden=48, layers=2, heads=4, kv_heads=2, **_VISION),
              "student-m": dict(hidden=64, layers=2, heads=4, kv_heads=2, **_VISION)},
    tower_steps=1200, teacher_steps=1600, teacher_lr=4e-4, ground_weight=0.3,
    student_steps=300, student_lr=1e-3, batch_size=16,
    irs_samples=64, pictures=4)


class Stages:
    """Wall time per stage, printed as each stage starts and ends."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        print(f"\n== {name}", flush=True)
        t0 = time.time()
        yield
        self.seconds[name] = round(time.time() - t0, 2)
        print(f"== {name}: {self.seconds[name]:.1f}s", flush=True)


def prepare_workdir(path: str) -> Path:
    """Recreate the workdir; refuse to delete a non-empty directory the demo did not create."""
    work = Path(path)
    if work.exists() and any(work.iterdir()) and not (work / MARKER).exists():
        raise AlignTIError(f"{path} exists and is not a demo workdir; pass another --workdir")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    (work / MARKER).write_text("created by alignti demo\n")
    return work


def train_config(student: Path, out: Path, plan: DemoPlan, steps: int, lr: float, seed: int, **kw) -> DistillConfig:
    """One distill run with the demo's fixed budget; `kw` are further `alignti distill` options."""
    return build(DistillConfig, dict(student=str(student), out=str(out), max_steps=steps, epochs=10_000, lr=lr,
                                     batch_size=plan.batch_size, warmup_steps=max(1, steps // 20), save_every=0,
                                     seed=seed, adam_beta2=0.98, progress=True, **kw))


def run_demo(cfg: DemoConfig) -> dict:
    """The whole pipeline; returns report.json's content."""
    plan = QUICK if cfg.quick else DEFAULT
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    hf_logging.disable_progress_bar()  # its bars per model load and save: noise, at these sizes done in ms
    stage, work = Stages(), prepare_workdir(cfg.workdir)
    shapes = work / "shapes"
    with stage("corpus"):
        corpus = run_shapes(ShapesConfig(out=str(shapes), n=plan.n, seed=cfg.seed, answer_style=cfg.answer_style))
    train_json, test_json = shapes / "train.json", shapes / "test.json"
    with stage("models"):
        init = assemble_models(work / "init", plan, train_json, cfg.seed)
    with stage("vision_tower"):  # stands in for a pretrained SigLIP shared by teacher and students
        tower, tower_result = pretrain_demo_tower(init["teacher"], train_json, shapes, plan.tower_steps, cfg.seed)
        copy_tower(tower, list(init.values()))
    with stage("teacher_sft"):
        teacher = train_teacher(init["teacher"], work / "teacher", plan, shapes, cfg.seed)
    with stage("irs"):
        irs = choose_iva_layer(teacher, shapes, work / "irs.json", plan.irs_samples)
    cache = work / "cache"
    with stage("extract"):
        extract = run_extract(ExtractConfig(teacher=str(teacher), data=str(train_json), image_root=str(shapes),
                                            out=str(cache), iva_layer=str(irs["layer"]), batch_size=16))
    models = {"teacher": {"role": "teacher", "recipe": TEACHER_RECIPE, "path": teacher, "size": "teacher"}}
    with stage("distill"):  # six independent runs from the one cache, --jobs at a time
        models.update(distill_students(init, work / "students", plan, cache, cfg))
    with stage("eval"):
        for name, m in models.items():
            m["scores"] = evaluate(m["path"], work / "eval" / name, shapes)
    with stage("saliency"):
        sal = saliency_pictures(teacher, test_json, shapes, irs["layer"], work / "saliency", plan.pictures)
    teacher_training = {"steps": plan.teacher_steps, "lr": plan.teacher_lr, "ground_weight": plan.ground_weight,
                        "ground_layer": GROUND_LAYER}
    setup = {"vision_tower": tower_result, "teacher_training": teacher_training,
             "test_questions": corpus["question_types"]["test"], "answer_style": cfg.answer_style}
    return write_report(work, models, cache, fingerprint_model_dir(teacher), extract, irs, sal, setup, stage.seconds,
                        cfg.quick)


def assemble_models(out: Path, plan: DemoPlan, corpus: Path, seed: int) -> dict[str, Path]:
    """Random teacher (its tokenizer trained on the corpus) and students sharing that tokenizer."""
    init = {"teacher": run_assemble(AssembleConfig(out=str(out / "teacher"), random=True, corpus=str(corpus),
                                                   seed=seed, **plan.teacher))}
    for name, size in plan.students.items():
        init[name] = run_assemble(AssembleConfig(out=str(out / name), random=True, seed=seed + 1,
                                                 tokenizer_from=str(init["teacher"]), **size))
    return init


def train_teacher(init: Path, out: Path, plan: DemoPlan, shapes: Path, seed: int) -> Path:
    """SFT with the grounding term on the corpus's object boxes -> the teacher's final directory."""
    return Path(run_distill(train_config(
        init, out, plan, plan.teacher_steps, plan.teacher_lr, seed, data=str(shapes / "train.json"),
        image_root=str(shapes), recipe="sft", train="full", ground_weight=plan.ground_weight,
        ground_layer=GROUND_LAYER))["final"])


def choose_iva_layer(teacher: Path, shapes: Path, out: Path, samples: int) -> dict:
    """`alignti irs` on the teacher; prints the choice. Returns irs.json's content plus "plot": the
    bar chart run_irs writes beside it."""
    irs = run_irs(IrsConfig(teacher=str(teacher), data=str(shapes / "train.json"), image_root=str(shapes),
                            out=str(out), samples=samples))
    irs["plot"] = str(out.with_suffix(".png"))
    others = [s for i, s in enumerate(irs["scores"]) if i != irs["layer"]]
    print(f"IVA layer l* = {irs['layer']}, IRS {irs['scores'][irs['layer']]:.3f}"
          + (f" (other layers <= {max(others):.3f})" if others else "") + f"; plot {irs['plot']}", flush=True)
    return irs


def distill_students(init: dict[str, Path], out: Path, plan: DemoPlan, cache: Path, cfg: DemoConfig) -> dict[str, dict]:
    """Every student size x recipe from the one cache, `cfg.jobs` at a time -> {run name: model entry}."""
    runs = {f"{name}-{recipe}": (name, recipe) for name in plan.students for recipe in RECIPES}
    configs = [train_config(init[name], out / run, plan, plan.student_steps, plan.student_lr, cfg.seed,
                            cache=str(cache), recipe=recipe, train="full")
               for run, (name, recipe) in runs.items()]
    done = run_many(configs, list(runs), cfg.jobs, cfg.threads)
    return {run: {"role": "student", "recipe": recipe, "path": Path(summary["final"]), "size": name}
            for (run, (name, recipe)), summary in zip(runs.items(), done)}


def evaluate(model: Path, out: Path, shapes: Path) -> dict:
    """`alignti eval` of one model on the held-out split -> its scores (its printed table names the model)."""
    return run_eval(EvalConfig(out=str(out), benchmark="shapes", questions=str(shapes / "test.json"),
                               image_root=str(shapes), model=str(model), batch_size=32))
