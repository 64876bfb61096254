"""`alignti eval`: answer a benchmark with a model (resumable), score it, write `OUT/scores.json`.

Three modes, one command:
- with `--model`: answer the questions not yet in the answers file, then score;
- without `--model`: score an existing answers file (no model is loaded);
- with `--report DIR...`: compare the `scores.json` of several runs in one table.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from alignti.cliargs import write_run_file
from alignti.data.corpus import check_image_root
from alignti.errors import AlignTIError
from alignti.eval.formats import BENCHMARKS, EvalQuestion, load_answers
from alignti.eval.generate import answer_questions, default_max_new_tokens, has_image, make_generator
from alignti.eval.questions import load_questions
from alignti.eval.report import build_report, scores_table
from alignti.eval.scoring import SCORING_MODES, match_answers, score_benchmark
from alignti.models.devices import check_device, check_dtype
from alignti.models.family import load_parts
from alignti.models.loading import load_model, resolve_device, resolve_dtype
from alignti.storage.files import write_json_atomic

RUN_FILE = "eval.yaml"  # OUT/eval.yaml: this run's options, as `alignti eval --config` reads them


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


def model_id_of(model: str) -> str:
    """The model's name as LLaVA writes it: the directory name (with its parent for checkpoint-N and for
    `alignti distill`'s OUT/final, so every student is named by its run)."""
    path = Path(model).resolve()
    named_by_parent = path.name.startswith("checkpoint-") or path.name == "final"
    return f"{path.parent.name}_{path.name}" if named_by_parent else path.name


def check_answers_benchmark(records: list[dict], benchmark: str, path: Path) -> None:
    """Records that name their benchmark (ours do; LLaVA's do not) must name this one."""
    other = next((r["benchmark"] for r in records if r.get("benchmark", benchmark) != benchmark), None)
    if other is not None:
        raise AlignTIError(f"answers file {str(path)!r} holds {other!r} answers, not {benchmark!r}")


def check_answers_owner(records: list[dict], benchmark: str, model_id: str, path: Path) -> None:
    """Resuming must not mix two models' (or two benchmarks') answers in one file."""
    check_answers_benchmark(records, benchmark, path)
    for rec in records:
        if rec.get("model_id") != model_id:
            raise AlignTIError(f"answers file {str(path)!r} holds answers of model {rec.get('model_id')!r}, "
                               f"not {model_id!r}; pass another --answers or --out")


def check_answers_match(questions: list[EvalQuestion], records: list[dict], path: Path, benchmark: str) -> None:
    """An answers file that answers none of the questions is the wrong file (another id scheme,
    another benchmark's, empty), not a score of 0."""
    check_answers_benchmark(records, benchmark, path)
    if not records:
        raise AlignTIError(f"answers file {str(path)!r} holds no answers")
    if not match_answers(questions, records):
        raise AlignTIError(f"answers file {str(path)!r} matches none of the {len(questions)} questions scored: "
                           f"its question_ids look like {records[0].get('question_id')!r}, the questions' like "
                           f"{questions[0].question_id!r} (answers of another benchmark or question file?)")


def generate_missing(cfg: EvalConfig, questions: list[EvalQuestion]) -> int:
    """Answer the questions the answers file lacks; loads the model only if there are some."""
    path, model_id = cfg.answers_path, model_id_of(cfg.model)
    existing = load_answers(path) if path.is_file() else []
    check_answers_owner(existing, cfg.benchmark, model_id, path)
    done = match_answers(questions, existing)
    todo = [q for q in questions if q.key not in done]
    if not todo:
        return 0
    if cfg.image_root is None and any(has_image(q) and not q.image_b64 for q in todo):
        raise AlignTIError(f"{cfg.benchmark} questions have images: pass --image-root")
    device = resolve_device(cfg.device)
    model = load_model(cfg.model, device, resolve_dtype(cfg.dtype, device), trust_remote_code=cfg.trust_remote_code)
    parts = load_parts(cfg.model, trust_remote_code=cfg.trust_remote_code)
    cap = cfg.max_new_tokens or default_max_new_tokens(cfg.benchmark, questions, parts.tokenizer)
    gen = make_generator(model, parts, cap)
    return answer_questions(gen, todo, path, cfg.image_root, model_id, cfg.batch_size)


def run_eval(cfg: EvalConfig) -> dict:
    """Answer (if --model), score and write OUT/scores.json; or build the --report table."""
    if cfg.report:
        report = build_report(cfg.dirs, cfg.out)
        write_run_file(cfg, Path(cfg.out) / RUN_FILE, "eval")
        return report
    start = time.time()
    questions = load_questions(cfg.benchmark, cfg.questions, cfg.annotations, cfg.image_root)
    questions = questions[:cfg.limit] if cfg.limit else questions
    generated = generate_missing(cfg, questions) if cfg.model else 0
    if cfg.model and any(q.answer is None for q in questions):
        # MMBench's test TSV has no answers: the answers file is the product (for its server).
        print(f"answers written to {cfg.answers_path}; this {cfg.benchmark} file has no ground truth, "
              "so nothing is scored (MMBench test: submit the answers to its evaluation server)")
        write_run_file(cfg, Path(cfg.out) / RUN_FILE, "eval")
        return {"benchmark": cfg.benchmark, "scored": False, "answers_file": str(cfg.answers_path.resolve()),
                "n_questions": len(questions), "generated": generated}
    answers = load_answers(cfg.answers_path)
    check_answers_match(questions, answers, cfg.answers_path, cfg.benchmark)
    result = score_benchmark(cfg.benchmark, questions, answers, cfg.scoring)
    ids = {str(r.get("model_id")) for r in answers if r.get("model_id") is not None}
    model_id = model_id_of(cfg.model) if cfg.model else (ids.pop() if len(ids) == 1 else None)
    result.update({
        "model_id": model_id, "model": str(Path(cfg.model).resolve()) if cfg.model else None,
        "questions_file": str(Path(cfg.questions).resolve()), "answers_file": str(cfg.answers_path.resolve()),
        "limit": cfg.limit, "generated": generated, "seconds": round(time.time() - start, 3),
    })
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    write_json_atomic(Path(cfg.out) / "scores.json", result, indent=2, ensure_ascii=False)
    write_run_file(cfg, Path(cfg.out) / RUN_FILE, "eval")
    print(scores_table(result))
    return result
