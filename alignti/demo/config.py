"""`alignti demo` options, torch-free (the CLI reads them; `alignti.demo.run` runs them)."""

from __future__ import annotations

from dataclasses import dataclass, field

from alignti.data.shapes_answers import ANSWER_STYLES
from alignti.errors import AlignTIError


@dataclass(frozen=True)
class DemoConfig:
    """`alignti demo` options."""

    workdir: str = field(default="demo-out", metadata={"help": "where everything is written (recreated)"})
    quick: bool = field(default=False, metadata={"help": "smaller corpus, models and budgets (<= 3 min)"})
    seed: int = field(default=0, metadata={"help": "corpus, initialisation and data-order seed"})
    threads: int = field(default=1, metadata={
        "help": "torch CPU threads per process (1 is fastest for these tiny models and robust on a busy machine)"})
    jobs: int = field(default=2, metadata={"help": "student distillations run at once (one process each)"})
    answer_style: str = field(default="short", metadata={"choices": ANSWER_STYLES, "help": (
        "the corpus's answer style (`alignti data shapes --answer-style`): teacher, cache and students all "
        "learn it")})

    def __post_init__(self) -> None:
        if self.jobs < 1 or self.threads < 1:
            raise AlignTIError("--jobs and --threads must be >= 1")
        if self.answer_style not in ANSWER_STYLES:
            raise AlignTIError(f"--answer-style must be one of {', '.join(ANSWER_STYLES)}, got {self.answer_style!r}")
