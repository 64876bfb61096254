"""`DistillConfig`: every option of `alignti distill` (the dataclass is the CLI).

The loss options reuse `LossConfig`'s defaults, choices and help (one source of truth);
`loss_config()` turns them into the `LossConfig` the step uses. Validation happens at
construction, so a bad command line fails with one AlignTIError line before anything loads.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from alignti.distill.losses import LossConfig, build_loss_config
from alignti.errors import AlignTIError

TRAIN_CHOICES = ("projector", "llm", "all", "full")
DTYPE_CHOICES = ("auto", "fp32", "bf16")
# Fields of DistillConfig that are passed to build_loss_config unchanged.
LOSS_FIELDS = ("divergence", "jsd_beta", "tail", "tpa_weighting", "iva_target", "chunk_size",
               "sft_weight", "kd_weight", "iva_weight", "tpa_weight", "ground_weight", "ground_layer")
# Fields that may differ between a checkpoint and the command resuming it (they do not change
# what is computed, only how long, how often it is saved or logged, and how it is shown).
RESUMABLE_CHANGES = frozenset({"resume", "overwrite", "save_every", "keep_checkpoints", "log_every", "epochs",
                               "max_steps", "progress", "example_memory_mb"})


def _loss_field(name: str) -> Any:
    """A field with LossConfig's default, help and choices for `name`."""
    f = next(x for x in dataclasses.fields(LossConfig) if x.name == name)
    return field(default=f.default, metadata=dict(f.metadata))


@dataclass(frozen=True)
class DistillConfig:
    """`alignti distill` options; field names are CLI option names (`_` -> `-`)."""

    student: str = field(metadata={"help": "student model directory (LLaVA-style, loadable with the Auto classes)"})
    out: str = field(metadata={"help": "output directory: log.jsonl, checkpoints/, final/ (the trained student)"})
    cache: str | None = field(default=None, metadata={"help": "teacher-signal cache from `alignti extract`"})
    data: str | None = field(default=None, metadata={
        "help": "corpus (LLaVA JSON/JSONL): required with --recipe sft and no --cache; "
                "with --cache, overrides the corpus path recorded in the cache"})
    image_root: str | None = field(default=None, metadata={
        "help": "image root (default: the one recorded in the cache; required for a corpus with images)"})
    recipe: str = _loss_field("recipe")
    sft_weight: float | None = _loss_field("sft_weight")
    kd_weight: float | None = _loss_field("kd_weight")
    iva_weight: float | None = _loss_field("iva_weight")
    tpa_weight: float | None = _loss_field("tpa_weight")
    ground_weight: float = _loss_field("ground_weight")
    ground_layer: int = _loss_field("ground_layer")
    divergence: str = _loss_field("divergence")
    jsd_beta: float = _loss_field("jsd_beta")
    tail: str = _loss_field("tail")
    tpa_weighting: str = _loss_field("tpa_weighting")
    iva_target: str = _loss_field("iva_target")
    iva_student_layer: int | None = field(default=None, metadata={
        "help": "student LM layer probed for --iva-target attention [default: the cache's IVA layer at the "
                "same relative depth]"})
    chunk_size: int = _loss_field("chunk_size")
    train: str = field(default="all", metadata={
        "help": "what trains: projector, llm (decoder + embeddings + LM head), all (projector + llm; the "
                "vision tower frozen, as in the paper) or full (everything, incl. the vision tower: for "
                "models trained from scratch, like the demo's)", "choices": TRAIN_CHOICES})
    epochs: int = field(default=1, metadata={"help": "passes over the samples"})
    max_steps: int | None = field(default=None, metadata={"help": "stop after this many optimizer steps"})
    lr: float = field(default=2e-5, metadata={"help": "peak learning rate (AdamW)"})
    warmup_ratio: float = field(default=0.03, metadata={"help": "linear warmup as a fraction of the steps"})
    warmup_steps: int | None = field(default=None, metadata={"help": "warmup steps (overrides --warmup-ratio)"})
    min_lr_ratio: float = field(default=0.0, metadata={"help": "cosine floor as a fraction of --lr"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay (not on biases and norms)"})
    example_memory_mb: int = field(default=512, metadata={
        "help": "keep built examples (pixels, tokens, signals) in RAM up to this many MB per process, so "
                "later epochs skip decoding and cache reads (0 = off)"})
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
    save_every: int = field(default=500, metadata={"help": "checkpoint every N optimizer steps (0 = only final)"})
    keep_checkpoints: int = field(default=2, metadata={"help": "most recent checkpoints kept (0 = all)"})
    resume: bool = field(default=False, metadata={"help": "continue from the latest checkpoint in --out"})
    overwrite: bool = field(default=False, metadata={"help": "delete an existing --out first"})
    seed: int = field(default=0, metadata={"help": "data order and RNG seed"})
    log_every: int = field(default=1, metadata={"help": "progress-bar refresh every N steps (log.jsonl gets all)"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})

    def __post_init__(self) -> None:
        if self.resume and self.overwrite:
            raise AlignTIError("--resume and --overwrite are mutually exclusive")
        if self.cache is None and self.data is None:
            raise AlignTIError("give --cache (teacher signals) or --data (a corpus, for --recipe sft)")
        loss = self.loss_config()  # validates recipe, divergence, weights
        if self.cache is None:
            distilled = {n: w for n, w in loss.weights().items() if n not in ("sft", "ground") and w > 0}
            if distilled:
                raise AlignTIError(f"without --cache only the sft and ground terms can train (--recipe sft); "
                                   f"got non-zero weights {distilled}")
        self._check_numbers()

    def _check_numbers(self) -> None:
        positive = {"epochs": self.epochs, "batch_size": self.batch_size, "grad_accum": self.grad_accum,
                    "max_length": self.max_length, "log_every": self.log_every}
        bad = [f"--{k.replace('_', '-')} {v}" for k, v in positive.items() if v < 1]
        if self.max_steps is not None and self.max_steps < 1:
            bad.append(f"--max-steps {self.max_steps}")
        if bad:
            raise AlignTIError(f"must be >= 1: {', '.join(bad)}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise AlignTIError(f"--lr must be a positive number, got {self.lr}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise AlignTIError(f"--warmup-ratio must be in [0, 1), got {self.warmup_ratio}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise AlignTIError(f"--min-lr-ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise AlignTIError(f"--warmup-steps must be >= 0, got {self.warmup_steps}")
        if self.example_memory_mb < 0:
            raise AlignTIError(f"--example-memory-mb must be >= 0, got {self.example_memory_mb}")
        if not 0.0 < self.adam_beta2 < 1.0:
            raise AlignTIError(f"--adam-beta2 must be in (0, 1), got {self.adam_beta2}")
        if self.weight_decay < 0 or self.max_grad_norm < 0:
            raise AlignTIError("--weight-decay and --max-grad-norm must be >= 0")
        if self.save_every < 0 or self.keep_checkpoints < 0:
            raise AlignTIError("--save-every and --keep-checkpoints must be >= 0")
        if self.iva_student_layer is not None and self.iva_student_layer < 0:
            raise AlignTIError(f"--iva-student-layer must be >= 0, got {self.iva_student_layer}")
        if self.dtype not in DTYPE_CHOICES:
            raise AlignTIError(f"--dtype must be one of {', '.join(DTYPE_CHOICES)}, got {self.dtype!r}")
        if self.train not in TRAIN_CHOICES:
            raise AlignTIError(f"--train must be one of {', '.join(TRAIN_CHOICES)}, got {self.train!r}")
        if self.device not in ("auto", "cpu") and not self.device.startswith("cuda"):
            raise AlignTIError(f"--device must be auto, cpu or cuda, got {self.device!r}")

    def loss_config(self) -> LossConfig:
        """The objective these options describe (recipe preset + overrides)."""
        return build_loss_config(self.recipe, **{name: getattr(self, name) for name in LOSS_FIELDS})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def resume_differences(self, saved: dict[str, Any]) -> list[str]:
        """Options that differ from a checkpoint's config and would change the computation."""
        mine = self.to_dict()
        return sorted(k for k in set(mine) | set(saved)
                      if k not in RESUMABLE_CHANGES and mine.get(k) != saved.get(k))
