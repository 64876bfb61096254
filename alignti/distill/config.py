"""`alignti distill` options: `LossConfig` (the objective) nested in `DistillConfig` (the run).

Both dataclasses are the CLI (`alignti.cliargs` flattens the nested `loss` into options of the
same command), so every option is declared once. Validation happens at construction, so a bad
command line fails with one AlignTIError line before anything loads. No torch here: `alignti
--help` must stay instant.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass, field, fields
from typing import Any

from alignti.cliargs import options
from alignti.errors import AlignTIError, check_min
from alignti.models.devices import check_device

TERMS = ("sft", "kd", "iva", "tpa", "ground")
# Recipe -> (sft, kd, iva, tpa) weights; "ground" is 0 unless asked for.
RECIPES: dict[str, tuple[float, float, float, float]] = {
    "sft": (1.0, 0.0, 0.0, 0.0),
    "kd": (1.0, 1.0, 0.0, 0.0),
    "alignti": (1.0, 1.0, 1.0, 1.0),
}
DIVERGENCES = ("fkl", "rkl", "jsd")
TAILS = ("bucket", "renorm")
TPA_WEIGHTINGS = ("teacher", "uniform", "student")
IVA_TARGETS = ("logits", "attention")
TRAIN_CHOICES = ("projector", "llm", "all", "full")
DTYPE_CHOICES = ("auto", "fp32", "bf16")
REPORT_TO = ("none", "tensorboard", "wandb")  # experiment trackers (alignti.distill.trackers)


def _choice(value: str, allowed: tuple[str, ...], option: str) -> None:
    if value not in allowed:
        raise AlignTIError(f"{option} must be one of {', '.join(allowed)}, got {value!r}")


@dataclass(frozen=True)
class LossConfig:
    """The distillation objective; field names are CLI option names (`_` -> `-`)."""

    recipe: str = field(default="alignti", metadata={"help": "loss weights preset", "choices": tuple(RECIPES)})
    sft_weight: float | None = field(default=None, metadata={"help": "weight of L_sft [default: from --recipe]"})
    kd_weight: float | None = field(default=None, metadata={"help": "weight of L_kd [default: from --recipe]"})
    iva_weight: float | None = field(default=None, metadata={"help": "weight of L_iva [default: from --recipe]"})
    tpa_weight: float | None = field(default=None, metadata={"help": "weight of L_tpa [default: from --recipe]"})
    ground_weight: float = field(default=0.0, metadata={
        "help": "weight of a grounding term for rows with object boxes: KL(boxes' patch share || the model's "
                "instruction-to-vision attention at --ground-layer); trains a teacher to look where it is asked "
                "(alignti.distill.grounding)"})
    ground_layer: int = field(default=1, metadata={"help": "LM layer whose attention --ground-weight trains"})
    divergence: str = field(default="fkl", metadata={
        "help": "fkl = KL(teacher||student), rkl = KL(student||teacher), jsd = generalised JSD", "choices": DIVERGENCES})
    jsd_beta: float = field(default=0.5, metadata={"help": "teacher weight of the JSD mixture, in [0, 1]"})
    tail: str = field(default="bucket", metadata={
        "help": "bucket = top-k plus an exact tail bucket; renorm = renormalised top-k", "choices": TAILS})
    tpa_weighting: str = field(default="teacher", metadata={
        "help": "TPA candidate weights: the teacher's probabilities of the cached candidates renormalised, uniform, "
                "or the student's own (detached, renormalised over the candidates: the paper samples them from the "
                "student online; a larger extraction --tpa-d makes the cached set cover more of them)",
        "choices": TPA_WEIGHTINGS})
    iva_target: str = field(default="logits", metadata={
        "help": "IVA target: teacher distributions at salient vision rows, or saliency vs student attention",
        "choices": IVA_TARGETS})
    iva_student_layer: int | None = field(default=None, metadata={
        "help": "student LM layer probed for --iva-target attention [default: the cache's IVA layer at the "
                "same relative depth]"})
    chunk_size: int = field(default=1024, metadata={"help": "rows per fp32 loss chunk (memory vs speed)"})

    def __post_init__(self) -> None:
        _choice(self.recipe, tuple(RECIPES), "--recipe")
        # A weight left at None takes the recipe's preset (frozen: set through object).
        for name, preset in zip(TERMS, RECIPES[self.recipe]):
            if getattr(self, f"{name}_weight") is None:
                object.__setattr__(self, f"{name}_weight", preset)
        for value, allowed, option in ((self.divergence, DIVERGENCES, "--divergence"), (self.tail, TAILS, "--tail"),
                                       (self.tpa_weighting, TPA_WEIGHTINGS, "--tpa-weighting"),
                                       (self.iva_target, IVA_TARGETS, "--iva-target")):
            _choice(value, allowed, option)
        if not 0.0 <= self.jsd_beta <= 1.0:
            raise AlignTIError(f"--jsd-beta must be in [0, 1], got {self.jsd_beta}")
        if self.chunk_size < 1 or self.ground_layer < 0:
            raise AlignTIError(f"--chunk-size must be >= 1 and --ground-layer >= 0, got {self.chunk_size}, "
                               f"{self.ground_layer}")
        if self.iva_student_layer is not None and self.iva_student_layer < 0:
            raise AlignTIError(f"--iva-student-layer must be >= 0, got {self.iva_student_layer}")
        weights = self.weights()
        bad = {n: w for n, w in weights.items() if not (math.isfinite(w) and w >= 0)}
        if bad:
            raise AlignTIError(f"loss weights must be finite and >= 0: {bad}")
        if not any(w > 0 for w in weights.values()):
            raise AlignTIError("every loss weight is 0: nothing to train")

    def weights(self) -> dict[str, float]:
        """{"sft", "kd", "iva", "tpa", "ground"} -> weight, the `weights` argument of `combine`."""
        return {n: float(getattr(self, f"{n}_weight")) for n in TERMS}

    def divergence_kwargs(self) -> dict[str, Any]:
        """The keyword arguments shared by kd_loss, iva_loss and tpa_loss."""
        return {"divergence": self.divergence, "beta": self.jsd_beta, "tail": self.tail, "chunk_size": self.chunk_size}


def _resumable(**meta: Any) -> dict[str, Any]:
    """Field metadata of an option that may change between a checkpoint and the run resuming it
    (it changes how long the run goes, how often it saves or logs, or how it is shown, not what
    each step computes)."""
    return {**meta, "resumable": True}


@dataclass(frozen=True)
class DistillConfig:
    """`alignti distill` options; field names are CLI option names (`_` -> `-`)."""

    student: str = field(metadata={"help": "student model directory (LLaVA or Qwen-VL, loadable with the Auto classes)"})
    out: str = field(metadata={"help": "output directory: log.jsonl, checkpoints/, final/ (the trained student)"})
    cache: str | None = field(default=None, metadata={"help": "teacher-signal cache from `alignti extract`"})
    data: str | None = field(default=None, metadata={
        "help": "corpus (LLaVA JSON/JSONL): required with --recipe sft and no --cache; "
                "with --cache, overrides the corpus path recorded in the cache"})
    image_root: str | None = field(default=None, metadata={
        "help": "image root (default: the one recorded in the cache; required for a corpus with images)"})
    loss: LossConfig = field(default_factory=LossConfig)
    train: str = field(default="all", metadata={
        "help": "what trains: projector, llm (decoder + embeddings + LM head), all (projector + llm; the "
                "vision tower frozen, as in the paper) or full (everything, incl. the vision tower: for "
                "models trained from scratch, like the demo's)", "choices": TRAIN_CHOICES})
    epochs: int = field(default=1, metadata=_resumable(help="passes over the samples"))
    max_steps: int | None = field(default=None, metadata=_resumable(help="stop after this many optimizer steps"))
    lr: float = field(default=2e-5, metadata={"help": "peak learning rate (AdamW)"})
    warmup_ratio: float = field(default=0.03, metadata={"help": "linear warmup as a fraction of the steps"})
    warmup_steps: int | None = field(default=None, metadata={"help": "warmup steps (overrides --warmup-ratio)"})
    min_lr_ratio: float = field(default=0.0, metadata={"help": "cosine floor as a fraction of --lr"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay (not on biases and norms)"})
    example_memory_mb: int = field(default=512, metadata=_resumable(
        help="keep built examples (pixels, tokens, signals) in RAM up to this many MB per process, so later "
             "epochs skip decoding and cache reads (0 = off)"))
    num_workers: int | None = field(default=None, metadata=_resumable(
        help="DataLoader worker processes per training process that build the coming micro-batches (image "
             "decode, tokenisation, cache reads, assembly) while the model trains; 0 = in the training process "
             "[default: 2 on GPU, 0 on CPU, where the step's threads already use every core]"))
    adam_beta2: float = field(default=0.999, metadata={
        "help": "AdamW beta2 (0.98 adapts faster; the demo's from-scratch models need it)"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping norm (0 = off)"})
    batch_size: int = field(default=4, metadata={"help": "samples per micro-batch per process"})
    grad_accum: int = field(default=1, metadata={
        "help": "micro-batches per optimizer step per process (global batch = batch-size x grad-accum x processes)"})
    max_length: int = field(default=2048, metadata={"help": "longer samples are rejected (too_long)"})
    dtype: str = field(default="auto", metadata={
        "help": "compute precision: auto = bf16 on GPU, fp32 on CPU; bf16 = bf16 autocast with fp32 master "
                "weights (fp16 is not offered: it needs loss scaling)", "choices": DTYPE_CHOICES})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda (under accelerate launch: "
                                                          "one GPU per process)"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "recompute decoder activations in backward"})
    save_every: int = field(default=500, metadata=_resumable(help="checkpoint every N optimizer steps (0 = only final)"))
    keep_checkpoints: int = field(default=2, metadata=_resumable(help="most recent checkpoints kept (0 = all)"))
    resume: bool = field(default=False, metadata=_resumable(help="continue from the latest checkpoint in --out"))
    overwrite: bool = field(default=False, metadata=_resumable(help="delete an existing --out first"))
    seed: int = field(default=0, metadata={"help": "data order and RNG seed"})
    log_every: int = field(default=1, metadata=_resumable(
        help="progress-bar refresh every N steps (log.jsonl gets all)"))
    progress: bool = field(default=True, metadata=_resumable(help="show a progress bar"))
    report_to: str = field(default="none", metadata=_resumable(
        help="experiment tracker for every loss term, lr, grad norm and tokens/s per step: tensorboard "
             "(OUT/tensorboard/; pip install 'alignti[tensorboard]') or wandb ('alignti[wandb]'; WANDB_MODE=offline "
             "works without an account)", choices=REPORT_TO))

    def __post_init__(self) -> None:
        if self.resume and self.overwrite:
            raise AlignTIError("--resume and --overwrite are mutually exclusive")
        if self.cache is None and self.data is None:
            raise AlignTIError("give --cache (teacher signals) or --data (a corpus, for --recipe sft)")
        if self.cache is None:
            distilled = {n: w for n, w in self.loss.weights().items() if n not in ("sft", "ground") and w > 0}
            if distilled:
                raise AlignTIError(f"without --cache only the sft and ground terms can train (--recipe sft); "
                                   f"got non-zero weights {distilled}")
        self._check_numbers()

    def _check_numbers(self) -> None:
        check_min(1, epochs=self.epochs, batch_size=self.batch_size, grad_accum=self.grad_accum,
                  max_length=self.max_length, log_every=self.log_every, max_steps=self.max_steps)
        check_min(0, warmup_steps=self.warmup_steps, example_memory_mb=self.example_memory_mb,
                  num_workers=self.num_workers, save_every=self.save_every, keep_checkpoints=self.keep_checkpoints,
                  seed=self.seed)
        if self.seed >= 2**32:  # numpy's seed range (accelerate's set_seed seeds numpy too)
            raise AlignTIError(f"--seed must be < 2**32, got {self.seed}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise AlignTIError(f"--lr must be a positive number, got {self.lr}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise AlignTIError(f"--warmup-ratio must be in [0, 1), got {self.warmup_ratio}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise AlignTIError(f"--min-lr-ratio must be in [0, 1], got {self.min_lr_ratio}")
        if not 0.0 < self.adam_beta2 < 1.0:
            raise AlignTIError(f"--adam-beta2 must be in (0, 1), got {self.adam_beta2}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0 and self.max_grad_norm >= 0):
            raise AlignTIError(f"--weight-decay (finite) and --max-grad-norm must be >= 0, got {self.weight_decay}, "
                               f"{self.max_grad_norm}")
        _choice(self.dtype, DTYPE_CHOICES, "--dtype")
        _choice(self.train, TRAIN_CHOICES, "--train")
        _choice(self.report_to, REPORT_TO, "--report-to")
        if self.report_to != "none" and importlib.util.find_spec(self.report_to) is None:
            raise AlignTIError(f"--report-to {self.report_to} needs the {self.report_to} package: "
                               f"pip install 'alignti[{self.report_to}]'")
        check_device(self.device, index=False)  # accelerate places each process on its own GPU


RESUMABLE_CHANGES = frozenset(f.name for f in fields(DistillConfig) if f.metadata.get("resumable"))


def resume_differences(cfg: DistillConfig, saved: dict[str, Any]) -> list[str]:
    """Options (flat, as `cliargs.options` gives them) that differ from a checkpoint's run and would
    change what is computed."""
    mine = options(cfg)
    return sorted(k for k in set(mine) | set(saved) if k not in RESUMABLE_CHANGES and mine.get(k) != saved.get(k))


@dataclass(frozen=True)
class PlotConfig:
    """`alignti plot` options."""

    out: str = field(metadata={"help": "distill output directory (reads its log.jsonl)", "argument": True})
    png: str | None = field(default=None, metadata={"help": "picture to write [default: OUT/loss.png]"})
