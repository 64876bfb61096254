"""`alignti eval` options, torch-free (the CLI reads them; `alignti.eval.run` runs them)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from alignti.data.corpus import check_image_root
from alignti.errors import AlignTIError
from alignti.eval.formats import BENCHMARKS
from alignti.eval.scoring import SCORING_MODES
from alignti.models.devices import check_device, check_dtype


@dataclass(frozen=True)
class EvalConfig:
    """`alignti eval` options."""

    out: str = field(metadata={"help": "output directory (answers.jsonl, scores.json; report.md/json for --report)"})
    benchmark: str | None = field(default=None, metadata={
        "help": "benchmark (see docs/eval.md for its files)", "choices": BENCHMARKS})
    questions: str | None = field(default=None, metadata={"help": "the benchmark's question file (LLaVA format)"})
    model: str | None = field(default=None, metadata={
        "help": "model directory; without it, only score an existing answers file"})
    annotations: str | None = field(default=None, metadata={
        "help": "ground-truth file or folder when not in LLaVA's layout next to --questions"})
    image_root: str | None = field(default=None, metadata={"help": "folder the question images are relative to"})
    answers: str | None = field(default=None, metadata={
        "help": "answers JSONL (default OUT/answers.jsonl); a rerun skips the questions it already answers"})
    scoring: str = field(default="llava", metadata={
        "help": "llava: LLaVA's original scripts; lmms-eval: lmms-eval's rules", "choices": SCORING_MODES})
    batch_size: int = field(default=8, metadata={"help": "questions per generate call"})
    max_new_tokens: int | None = field(default=None, metadata={
        "help": "generated-token cap (default per benchmark: 32 for textvqa; shapes: twice its longest gold answer, "
                "at least 16; 16 otherwise)"})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda[:i]"})
    dtype: str = field(default="auto", metadata={"help": "auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16 | fp16"})
    limit: int | None = field(default=None, metadata={"help": "only the first N questions (answered and scored)"})
    trust_remote_code: bool = field(default=False, metadata={"help": "allow the model directory's own code"})
    report: bool = field(default=False, metadata={
        "help": "compare the scores.json of the DIRS given as arguments in one table (other options ignored)"})
    dirs: list[str] = field(default_factory=list, metadata={"argument": True, "help": "score directories for --report"})

    def __post_init__(self) -> None:
        if Path(self.out).exists() and not Path(self.out).is_dir():
            raise AlignTIError(f"--out {self.out!r} exists and is not a directory")
        if self.report:
            if not self.dirs:
                raise AlignTIError("--report needs one or more score directories: alignti eval --report DIR... --out OUT")
            return
        if self.benchmark is None or self.questions is None:
            raise AlignTIError("--benchmark and --questions are required (or --report DIR... to compare runs)")
        if self.benchmark not in BENCHMARKS:
            raise AlignTIError(f"unknown benchmark {self.benchmark!r}; choose one of {', '.join(BENCHMARKS)}")
        if self.scoring not in SCORING_MODES:
            raise AlignTIError(f"unknown scoring {self.scoring!r}; choose one of {', '.join(SCORING_MODES)}")
        if self.batch_size < 1 or (self.max_new_tokens is not None and self.max_new_tokens < 1):
            raise AlignTIError("--batch-size and --max-new-tokens must be >= 1")
        if self.limit is not None and self.limit < 1:
            raise AlignTIError("--limit must be >= 1")
        check_device(self.device)
        check_dtype(self.dtype)
        if self.image_root is not None:
            check_image_root(self.image_root)
        if self.model is None and not self.answers_path.is_file():
            raise AlignTIError(f"no --model and no answers file at {str(self.answers_path)!r}: "
                               "give --model to answer, or --answers FILE to score")

    @property
    def answers_path(self) -> Path:
        return Path(self.answers) if self.answers else Path(self.out) / "answers.jsonl"
