"""`alignti eval`: answer a benchmark with a model (resumable), score it, write `OUT/scores.json`.

Three modes, one command:
- with `--model`: answer the questions not yet in the answers file, then score;
- without `--model`: score an existing answers file (no model is loaded);
- with `--report DIR...`: compare the `scores.json` of several runs in one table.
"""

from __future__ import annotations

import time
from pathlib import Path

from alignti.cliargs import write_run_file
from alignti.errors import AlignTIError
from alignti.eval.config import EvalConfig
from alignti.eval.formats import EvalQuestion, image_path, load_answers
from alignti.eval.generate import answer_questions, default_max_new_tokens, has_image, make_generator
from alignti.eval.questions import load_questions
from alignti.eval.report import build_report, scores_table
from alignti.eval.scoring import match_answers, score_benchmark
from alignti.models.family import load_parts
from alignti.models.loading import load_model, resolve_device, resolve_dtype
from alignti.storage.files import write_json_atomic

RUN_FILE = "eval.yaml"  # OUT/eval.yaml: this run's options, as `alignti eval --config` reads them


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
    for q in todo:  # every image file before the model loads (nothing is written yet)
        if has_image(q) and not q.image_b64:
            image_path(q, cfg.image_root)
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
