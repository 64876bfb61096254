"""What every benchmark shares: `EvalQuestion`, LLaVA-1.5's prompt suffixes, the text that tells
apart questions sharing an id, reading the benchmark files, the answers JSONL, and images.

The per-benchmark question files are read by `alignti.eval.questions.load_questions`.

`question_id` is kept exactly as the file has it, so our answers files stay LLaVA-compatible.
It is not always unique (TextVQA uses the image id, MME the image path: two questions per
image), so every question also has a unique `key`: the id, plus the core question text where
the id repeats (`question_core`). `alignti.eval.scoring.matching` joins answers the same way.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from PIL import Image

from alignti.data.corpus import Reject, resolve_image_path
from alignti.errors import AlignTIError

SHORT_ANSWER = "Answer the question using a single word or phrase."
LETTER_ANSWER = "Answer with the option's letter from the given choices directly."
MME_YES_NO = "Please answer yes or no."
BENCHMARKS = ("gqa", "textvqa", "pope", "mme", "scienceqa", "mmbench", "shapes")
# LLaVA-1.5's suffixes (already inside LLaVA's converted jsonl files; added when missing).
# Shapes gets none: the demo model is trained on the corpus's bare questions.
PROMPT_SUFFIX = {"gqa": SHORT_ANSWER, "textvqa": SHORT_ANSWER, "pope": SHORT_ANSWER, "mme": SHORT_ANSWER,
                 "scienceqa": LETTER_ANSWER, "mmbench": LETTER_ANSWER, "shapes": ""}
MMBENCH_GROUP = 1_000_000  # MMBench stores circular copies at index k * 1e6 + base index


@dataclass(frozen=True)
class EvalQuestion:
    """One benchmark question, ready for generation and scoring.

    `prompt` is the user text that follows the image (suffix included, no `<image>` tag);
    `image` is a path relative to the image root (None for text-only ScienceQA questions and
    for MMBench, whose image is inline base64 in `image_b64`). `answer` is the ground truth in
    the benchmark's own form: a string (GQA, POPE "yes"/"no", MME "yes"/"no", MMBench letter,
    shapes), the list of 10 human answers (TextVQA) or the correct choice index (ScienceQA).
    """

    benchmark: str
    question_id: str | int
    key: str
    prompt: str
    image: str | None
    answer: Any = field(compare=False)
    meta: Mapping[str, Any] = field(default_factory=dict, compare=False)
    image_b64: str | None = field(default=None, compare=False, repr=False)


def with_suffix(text: str, suffix: str) -> str:
    """`text` + newline + `suffix`, unless it already ends with it (LLaVA's files already do)."""
    text = text.strip()
    if not suffix or text.endswith(suffix):
        return text
    return f"{text}\n{suffix}"


def _squash(text: str) -> str:
    return " ".join(text.split())


def textvqa_question(prompt: str) -> str:
    """The bare question inside a TextVQA prompt, lower-cased (the rule of LLaVA's eval_textvqa.py:
    the question line, skipping "Reference OCR token:" lines and the suffix)."""
    m = re.search(r"Question: (.*?) Short answer:", prompt, re.DOTALL)
    if prompt.startswith("OCR tokens: ") and m:
        return m.group(1).strip().lower()
    lines = [ln for ln in prompt.strip().split("\n") if ln.strip()]
    lines = [ln for ln in lines if not ln.startswith("Reference OCR token:") and ln.strip() != SHORT_ANSWER]
    return (lines[0] if lines else "").strip().lower()


def mme_question(prompt: str) -> str:
    """MME's question as its txt files spell it, minus suffixes and spacing (convert_answer_to_mme.py
    strips the short-answer suffix and tolerates one or two spaces before "Please answer yes or no.")."""
    return _squash(prompt.replace(SHORT_ANSWER, "").replace(MME_YES_NO, ""))


def question_core(benchmark: str, prompt: str) -> str:
    """What tells apart two questions that share a question_id."""
    if benchmark == "textvqa":
        return textvqa_question(prompt)
    if benchmark == "mme":
        return mme_question(prompt)
    suffix = PROMPT_SUFFIX.get(benchmark, "")
    return _squash(prompt.replace(suffix, "") if suffix else prompt)


# ---------------------------------------------------------------- file reading helpers

def read_text(path: Path, what: str) -> str:
    """The UTF-8 text of `path`; `what` names the file in the one-line error a user sees."""
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise AlignTIError(f"{what} not found: {str(path)!r}") from None
    except UnicodeDecodeError as e:
        raise AlignTIError(f"{what} {str(path)!r} is not UTF-8 text (byte 0x{e.object[e.start]:02x} "
                           f"at offset {e.start})") from None
    except OSError as e:  # a directory, no permission, ...
        raise AlignTIError(f"{what} {str(path)!r} cannot be read: {e.strerror or e}") from None


def read_json(path: Path, what: str) -> Any:
    """The JSON document in `path`; `what` names the file in the error a user sees."""
    try:
        return json.loads(read_text(path, what))
    except json.JSONDecodeError as e:
        raise AlignTIError(f"{what} {str(path)!r} is not valid JSON: {e}") from None


def read_jsonl(path: Path, what: str, cut_tail_ok: bool = False) -> list[dict]:
    """JSON objects, one per non-blank line. With `cut_tail_ok`, a last line without a newline
    that does not parse (a writer killed mid-line) is dropped instead of being an error."""
    lines = read_text(path, what).split("\n")
    rows = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            if cut_tail_ok and n == len(lines):
                break
            raise AlignTIError(f"{what} {str(path)!r} line {n}: not JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise AlignTIError(f"{what} {str(path)!r} line {n}: not a JSON object")
        rows.append(obj)
    return rows


def need(row: Mapping, name: str, where: str) -> Any:
    """`row[name]`, or an error naming the field and `where` the row is."""
    if name not in row or row[name] is None:
        raise AlignTIError(f"{where}: missing field {name!r}")
    return row[name]


def locate(given: str | Path | None, questions: Path, candidates: list[Path], what: str) -> Path:
    """`given` if set, else the first existing candidate; a clear error otherwise."""
    if given is not None:
        p = Path(given)
        if not p.exists():
            raise AlignTIError(f"{what} not found: {str(p)!r}")
        return p
    for p in candidates:
        if p.exists():
            return p
    looked = ", ".join(repr(str(p)) for p in candidates)
    raise AlignTIError(f"{what} is needed to score {questions.name!r}; pass it with --annotations (looked in {looked})")


# ---------------------------------------------------------------- answers JSONL and images

def load_answers(path: str | Path) -> list[dict]:
    """Answer records `{"question_id", "prompt", "text", "model_id", "benchmark", ...}`, one JSON
    object per line (LLaVA's answer-file shape). A final line cut short by an interrupted run is
    ignored; any other bad line is an error."""
    records = read_jsonl(Path(path), "answers file", cut_tail_ok=True)
    for n, rec in enumerate(records, 1):
        if "question_id" not in rec or not isinstance(rec.get("text"), str):
            raise AlignTIError(f"answers file {str(path)!r} record {n}: needs 'question_id' and a string 'text'")
    return records


def image_path(question: EvalQuestion, image_root: str | Path | None) -> Path:
    """The question's image file under `image_root` (never outside it); AlignTIError naming the question
    when it has none, the root is missing, or the path is unusable (missing, a NUL byte, outside the root)."""
    if question.image is None:
        raise AlignTIError(f"question {question.key!r} has no image")
    if image_root is None:
        raise AlignTIError(f"question {question.key!r} needs --image-root to find {question.image!r}")
    path = resolve_image_path(image_root, question.image)
    if isinstance(path, Reject):
        raise AlignTIError(f"question {question.key!r}: image {path.detail}")
    return path


def open_image(question: EvalQuestion, image_root: str | Path | None) -> Image.Image:
    """The question's image as RGB: decoded from `image_b64`, or read from under `image_root`
    (never from outside it)."""
    if question.image_b64:
        try:
            return Image.open(io.BytesIO(base64.b64decode(question.image_b64, validate=False))).convert("RGB")
        except (binascii.Error, OSError, ValueError) as e:
            raise AlignTIError(f"question {question.key!r}: inline image cannot be decoded ({e})") from None
    path = image_path(question, image_root)
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except OSError as e:  # image_path found the file: it is unreadable (or gone since)
        raise AlignTIError(f"image {str(path)!r} cannot be read ({e})") from None
