"""Score tables: the short summary printed after one run, and `--report DIR...`, which puts the
`scores.json` of several runs side by side (models x benchmarks) as markdown and JSON.

Columns follow the Align-TI model zoo's order (GQA, SQA, TextVQA, POPE, MME, MMB), then shapes
with one column per question type. A column scored with `--scoring lmms-eval` is labelled so;
the two modes give different numbers and never share a column. A value from a run that did not
answer every question, or ran with `--limit`, is starred and explained under the table.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

from alignti.errors import AlignTIError
from alignti.storage.files import write_json_atomic, write_text_atomic

COLUMN_ORDER = ("gqa", "scienceqa", "textvqa", "pope", "mme", "mmbench", "shapes")
LABELS = {"gqa": "GQA", "scienceqa": "SQA-IMG", "textvqa": "TextVQA", "pope": "POPE", "mme": "MME",
          "mmbench": "MMB", "shapes": "shapes"}
# Printed after one run: headline first, then the scalar sub-metrics worth a glance.
_SUMMARY_KEYS = ("score", "accuracy", "vanilla_accuracy", "accuracy_all", "perception", "cognition", "total",
                 "perception_percent", "n_questions", "n_answered", "missing", "unparsed", "unmatched_answers",
                 "duplicate_answers")


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.2f}"
    return "-" if value is None else str(value)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub markdown table; floats with two decimals, None as "-"."""
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def scores_table(result: Mapping) -> str:
    """The short table printed after `alignti eval` (every number is also in scores.json)."""
    rows: list[tuple[str, object]] = [(k, result[k]) for k in _SUMMARY_KEYS if k in result]
    for split, m in (result.get("splits") or {}).items():  # POPE
        rows += [(f"{split} f1", m["f1"]), (f"{split} accuracy", m["accuracy"]), (f"{split} yes_ratio", m["yes_ratio"])]
    for qtype, acc in (result.get("per_question_type") or {}).items():  # shapes
        rows.append((f"{qtype} accuracy", acc))
    title = f"{result.get('benchmark')} ({result.get('scoring')} scoring), model {result.get('model_id') or '-'}"
    return title + "\n" + markdown_table(["metric", "value"], rows)


def _columns(result: Mapping) -> dict[str, float]:
    """{column label: value} one scores.json contributes."""
    bench = str(result.get("benchmark"))
    mode = "" if result.get("scoring", "llava") == "llava" else f" ({result['scoring']})"
    label = LABELS.get(bench, bench) + mode
    cols = {label: result["score"]}
    if bench == "mme" and "perception_percent" in result:
        cols[f"MME %{mode}"] = result["perception_percent"]  # the 0-100 form in the Align-TI model zoo
    for qtype, acc in (result.get("per_question_type") or {}).items():
        cols[f"shapes:{qtype}{mode}"] = acc
    return cols


def _partial_note(result: Mapping) -> str | None:
    """Why a run's numbers are not over the whole benchmark, or None."""
    notes = []
    if result.get("limit"):
        notes.append(f"first {result['limit']} questions only")
    if result.get("missing"):
        notes.append(f"{result['missing']} of {result.get('n_questions')} questions unanswered")
    return ", ".join(notes) or None


def read_scores(directory: str | Path) -> dict:
    """DIR/scores.json, checked for the fields a report needs."""
    path = Path(directory) / "scores.json"
    try:
        result = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AlignTIError(f"no scores.json in {str(directory)!r} (run alignti eval with --out there first)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AlignTIError(f"{str(path)!r} is not valid JSON: {e}") from None
    if not isinstance(result, dict) or "benchmark" not in result or "score" not in result:
        raise AlignTIError(f"{str(path)!r} is not an alignti eval scores file (needs 'benchmark' and 'score')")
    return result


def _column_key(label: str) -> tuple:
    """Sort columns in model-zoo order; shapes' per-type columns after its headline."""
    bench = next((b for b, lab in LABELS.items() if label.startswith(lab)), label)
    rank = COLUMN_ORDER.index(bench) if bench in COLUMN_ORDER else len(COLUMN_ORDER)
    return rank, ":" in label or "%" in label, label


def collect(dirs: Sequence[str | Path]) -> dict:
    """{"columns", "models", "table": {model: {column: value}}, "notes", "sources"} from score dirs."""
    table: dict[str, dict[str, float]] = {}
    sources: dict[str, dict[str, str]] = {}
    notes: dict[str, dict[str, str]] = {}
    for d in dirs:
        result = read_scores(d)
        model = str(result.get("model_id") or Path(d).resolve().name)
        for col, value in _columns(result).items():
            if col in table.setdefault(model, {}):
                raise AlignTIError(f"{str(d)!r} and {sources[model][col]!r} both give {model}'s {col} score")
            table[model][col] = value
            sources.setdefault(model, {})[col] = str(d)
            note = _partial_note(result)
            if note:
                notes.setdefault(model, {})[col] = note
    columns = sorted({c for row in table.values() for c in row}, key=_column_key)
    return {"columns": columns, "models": list(table), "table": table, "notes": notes, "sources": sources}


def report_markdown(report: Mapping) -> str:
    """The models x benchmarks table; starred cells are partial runs, explained below it."""
    rows = []
    for model in report["models"]:
        cells: list[object] = [model]
        for col in report["columns"]:
            value = report["table"][model].get(col)
            partial = col in report["notes"].get(model, {})
            cells.append(None if value is None else f"{value:.2f}{'*' if partial else ''}")
        rows.append(cells)
    text = markdown_table(["model", *report["columns"]], rows)
    footnotes = [f"\\* {model}, {col}: {note}" for model, cols in report["notes"].items() for col, note in cols.items()]
    return text + ("\n\n" + "\n".join(footnotes) if footnotes else "") + "\n"


def build_report(dirs: Sequence[str | Path], out: str | Path) -> dict:
    """Write OUT/report.md and OUT/report.json for the score dirs, print the table, return the JSON."""
    report = collect(dirs)
    md = report_markdown(report)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "report.md", md)
    write_json_atomic(out / "report.json", report, indent=2)
    print(md, end="")
    return report
