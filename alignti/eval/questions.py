"""Benchmark question files -> `EvalQuestion`s, one loader per benchmark.

Question files are read in the formats LLaVA's docs/Evaluation.md uses (see docs/eval.md for the
exact files each benchmark needs). Ground truth that LLaVA keeps in a separate file (GQA's
testdev_balanced_questions.json, TextVQA_0.5.1_val.json, POPE's coco_pope_*.json, MME's txt
files, ScienceQA's problems.json) is joined here, so a scorer only ever sees `EvalQuestion`s.
`annotations` names that file or folder; when it is None the standard LLaVA playground layout
next to the question file is tried. Where the ground-truth file holds the questions too (GQA's
testdev_balanced_questions.json, ScienceQA's problems.json with pid_splits.json, POPE's
coco_pope_<split>.json), it can be the question file itself and LLaVA's file is not needed.
"""

from __future__ import annotations

import csv
import io
import json
import re
import sys
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Mapping

from alignti.errors import AlignTIError
from alignti.eval.formats import (BENCHMARKS, LETTER_ANSWER, MMBENCH_GROUP, SHORT_ANSWER, EvalQuestion, locate,
                                  mme_question, need, question_core, read_json, read_jsonl, read_text,
                                  textvqa_question, with_suffix)

# pandas.read_table's default NA strings: LLaVA reads the MMBench TSV with pandas, so an option
# spelled like one of these is treated as absent there; we do the same.
_PANDAS_NA = {"", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN",
              "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null"}


def _json_document(path: Path, what: str) -> Any:
    """The file as one JSON document, or None when it is not one (JSON Lines, LLaVA's format)."""
    try:
        return json.loads(read_text(path, what))
    except json.JSONDecodeError:
        return None


def _gqa_question(qid: str | int, text: str, image: str | None, entry: Mapping, where: str) -> EvalQuestion:
    types = entry.get("types") or {}
    return EvalQuestion("gqa", qid, "", with_suffix(text, SHORT_ANSWER), image, need(entry, "answer", where),
                        {"structural": types.get("structural"), "semantic": types.get("semantic")})


def _load_gqa(path: Path, annotations: str | Path | None, image_root: str | Path | None) -> list[EvalQuestion]:
    own = _json_document(path, "GQA questions")
    if isinstance(own, dict) and own and all(isinstance(v, dict) for v in own.values()):
        # GQA's own testdev_balanced_questions.json: {qid: {"question", "imageId", "answer", "types"}};
        # LLaVA's jsonl is this file with "<imageId>.jpg" as image and the suffix added.
        return [_gqa_question(qid, need(e, "question", f"{path.name} {qid}"),
                              f"{need(e, 'imageId', f'{path.name} {qid}')}.jpg", e, f"{path.name} {qid}")
                for qid, e in own.items()]
    ann_path = locate(annotations, path, [path.parent / "testdev_balanced_questions.json",
                                           path.parent / "data" / "testdev_balanced_questions.json"],
                       "GQA answers (testdev_balanced_questions.json)")
    gold = read_json(ann_path, "GQA answers")
    out = []
    for n, row in enumerate(read_jsonl(path, "GQA questions"), 1):
        where = f"{path.name} line {n}"
        qid = need(row, "question_id", where)
        entry = gold.get(str(qid))
        if entry is None:
            raise AlignTIError(f"{where}: question {qid!r} is not in {ann_path.name}")
        out.append(_gqa_question(qid, need(row, "text", where), row.get("image"), entry, f"{ann_path.name} {qid}"))
    return out


def _load_textvqa(path: Path, annotations: str | Path | None, image_root: str | Path | None) -> list[EvalQuestion]:
    ann_path = locate(annotations, path, [path.parent / "TextVQA_0.5.1_val.json"],
                       "TextVQA annotations (TextVQA_0.5.1_val.json)")
    data = need(read_json(ann_path, "TextVQA annotations"), "data", ann_path.name)
    # LLaVA's jsonl uses the image id as question_id and eval_textvqa.py joins on (image id,
    # lower-cased question); files that carry TextVQA's own numeric question_id also work.
    by_pair = {(str(a["image_id"]), a["question"].strip().lower()): a for a in data}
    by_id = {str(a["question_id"]): a for a in data}
    out = []
    for n, row in enumerate(read_jsonl(path, "TextVQA questions"), 1):
        where = f"{path.name} line {n}"
        qid, text = need(row, "question_id", where), need(row, "text", where)
        ann = by_pair.get((str(qid), textvqa_question(text))) or by_id.get(str(qid))
        if ann is None:
            raise AlignTIError(f"{where}: no annotation for ({qid!r}, {textvqa_question(text)!r}) in {ann_path.name}")
        out.append(EvalQuestion("textvqa", qid, "", with_suffix(text, SHORT_ANSWER), row.get("image"),
                                list(ann["answers"]), {"question": ann["question"]}))
    return out


def _pope_split(row: Mapping, path: Path, where: str) -> str:
    """A labelled row's split: its `category`, else the <split> of a file named coco_pope_<split>.json."""
    if row.get("category") is not None:
        return str(row["category"])
    m = re.fullmatch(r"coco_pope_(.+)\.json", path.name)
    if m is None:
        raise AlignTIError(f"{where}: no 'category', and the file is not named coco_pope_<split>.json, "
                           "so its POPE split is unknown")
    return m.group(1)


def _load_pope(path: Path, annotations: str | Path | None, image_root: str | Path | None) -> list[EvalQuestion]:
    label_dir: Path | None = None
    labels: dict[str, dict] = {}
    rows = read_jsonl(path, "POPE questions")
    out = []
    for n, row in enumerate(rows, 1):
        where = f"{path.name} line {n}"
        text = need(row, "text", where)
        if "label" in row:  # POPE's own coco_pope_<split>.json as the question file: labels inside
            out.append(EvalQuestion("pope", need(row, "question_id", where), "", with_suffix(text, SHORT_ANSWER),
                                    row.get("image"), str(need(row, "label", where)).strip().lower(),
                                    {"split": _pope_split(row, path, where)}))
            continue
        split = str(need(row, "category", where))
        if label_dir is None:
            label_dir = locate(annotations, path, [path.parent / "coco", path.parent],
                               "POPE label folder (coco_pope_<split>.json)")
        if split not in labels:
            # eval_pope.py pairs labels with answers by position; joining on (image, question)
            # gives the same pairs without trusting file order.
            recs = read_jsonl(label_dir / f"coco_pope_{split}.json", f"POPE labels for {split!r}")
            labels[split] = {(r.get("image"), question_core("pope", r.get("text", ""))): r for r in recs}
        lab = labels[split].get((row.get("image"), question_core("pope", text)))
        if lab is None:
            raise AlignTIError(f"{where}: no label for ({row.get('image')!r}, {text!r}) in coco_pope_{split}.json")
        out.append(EvalQuestion("pope", need(row, "question_id", where), "", with_suffix(text, SHORT_ANSWER),
                                row.get("image"), str(lab["label"]).strip().lower(), {"split": split}))
    return out


def _mme_truth(root: Path, category: str, stem: str, cache: dict) -> dict[str, str]:
    """{question core: "yes"/"no"} from MME's `<category>/[questions_answers_YN/]<stem>.txt`."""
    if (category, stem) not in cache:
        cat = root / category
        qa_dir = cat / "questions_answers_YN" if (cat / "images").is_dir() else cat
        txt = qa_dir / f"{stem}.txt"
        if not txt.is_file():
            raise AlignTIError(f"MME answer file not found: {str(txt)!r}")
        truth = {}
        for line in read_text(txt, "MME answer file").splitlines():
            if line.strip():
                question, _, answer = line.rstrip("\n").rpartition("\t")
                truth[mme_question(question)] = answer.strip().lower()
        cache[(category, stem)] = truth
    return cache[(category, stem)]


def _load_mme(path: Path, annotations: str | Path | None, image_root: str | Path | None) -> list[EvalQuestion]:
    cands = [path.parent / "MME_Benchmark_release_version"] + ([Path(image_root)] if image_root else [])
    root = locate(annotations, path, cands, "MME folder (MME_Benchmark_release_version)")
    cache: dict = {}
    out = []
    for n, row in enumerate(read_jsonl(path, "MME questions"), 1):
        where = f"{path.name} line {n}"
        qid, text = str(need(row, "question_id", where)), need(row, "text", where)
        category = str(row.get("category") or qid.split("/")[0])
        truth = _mme_truth(root, category, Path(qid.split("/")[-1]).stem, cache)
        answer = truth.get(mme_question(text))
        if answer is None:
            raise AlignTIError(f"{where}: question {mme_question(text)!r} not in MME's answers for {qid!r}")
        out.append(EvalQuestion("mme", qid, "", with_suffix(text, SHORT_ANSWER), row.get("image", qid), answer,
                                {"category": category}))
    return out


def _sqa_question(qid: str | int, prompt: str, image: str | None, prob: Mapping, pid: str) -> EvalQuestion:
    return EvalQuestion("scienceqa", qid, "", with_suffix(prompt, LETTER_ANSWER), image,
                        int(need(prob, "answer", f"problems.json {pid}")),
                        {"choices": list(need(prob, "choices", f"problems.json {pid}")),
                         "subject": prob.get("subject")})


def _sqa_own(path: Path, problems: Mapping) -> list[EvalQuestion]:
    """problems.json as the question file: the test problems of the pid_splits.json beside it,
    prompted as lmms-eval's scienceqa task (and LLaVA-1.5's llava_test_CQM-A.json) prompt them:
    "Context: <hint>" (when there is one), the question, "A. <choice>" lines."""
    splits = path.parent / "pid_splits.json"
    if not splits.is_file():
        raise AlignTIError(f"{path.name} as the question file needs pid_splits.json next to it (it names the "
                           f"test problems): not found in {str(path.parent)!r}")
    out = []
    for pid in map(str, need(read_json(splits, "pid_splits.json"), "test", splits.name)):
        prob = problems.get(pid)
        if not isinstance(prob, dict):
            raise AlignTIError(f"pid_splits.json: test problem {pid!r} is not in {path.name}")
        where = f"{path.name} {pid}"
        context = f"Context: {prob['hint']}\n" if prob.get("hint") else ""
        options = "\n".join(f"{'ABCDE'[i]}. {c}" for i, c in enumerate(need(prob, "choices", where)))
        image = f"{pid}/{prob['image']}" if prob.get("image") else None
        out.append(_sqa_question(pid, f"{context}{need(prob, 'question', where)}\n{options}", image, prob, pid))
    return out


def _load_scienceqa(path: Path, annotations: str | Path | None, image_root: str | Path | None) -> list[EvalQuestion]:
    rows = read_json(path, "ScienceQA questions")
    if isinstance(rows, dict):
        return _sqa_own(path, rows)
    if not isinstance(rows, list):
        raise AlignTIError(f"{path.name}: expected a JSON list of LLaVA conversation records, or problems.json")
    base = locate(annotations, path, [path.parent / "problems.json"], "ScienceQA problems.json")
    base = base.parent if base.is_file() else base
    problems = read_json(base / "problems.json", "ScienceQA problems.json")
    splits = base / "pid_splits.json"
    # eval_science_qa.py scores the problems of the test split only.
    test_ids = set(map(str, read_json(splits, "pid_splits.json")["test"])) if splits.is_file() else None
    out = []
    for n, row in enumerate(rows):
        where = f"{path.name} record {n}"
        pid = str(need(row, "id", where))
        if test_ids is not None and pid not in test_ids:
            continue
        prob = problems.get(pid)
        if prob is None:
            raise AlignTIError(f"{where}: problem {pid!r} is not in problems.json")
        human = next((t.get("value", "") for t in row.get("conversations", []) if t.get("from") == "human"), None)
        if human is None:
            raise AlignTIError(f"{where}: no human turn in 'conversations'")
        out.append(_sqa_question(need(row, "id", where), human.replace("<image>", ""), row.get("image"), prob, pid))
    return out


def _tsv_rows(path: Path) -> list[dict[str, str]]:
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # inline base64 images are long fields
    text = read_text(path, "MMBench TSV")
    try:
        return list(csv.DictReader(io.StringIO(text, newline=""), delimiter="\t"))
    except csv.Error as e:
        raise AlignTIError(f"MMBench TSV {str(path)!r} is malformed: {e}") from None


def _present(value: str | None) -> bool:
    return value is not None and value not in _PANDAS_NA and value.strip().lower() not in ("nan", "none")


def _load_mmbench(path: Path, annotations: str | Path | None, image_root: str | Path | None) -> list[EvalQuestion]:
    rows = _tsv_rows(path)
    images = {r.get("index"): r.get("image") for r in rows}
    out = []
    for n, row in enumerate(rows, 2):
        where = f"{path.name} line {n}"
        try:
            index = int(need(row, "index", where))
        except ValueError:
            raise AlignTIError(f"{where}: index {row['index']!r} is not an integer") from None
        options = {}
        for letter in "ABCD":  # model_vqa_mmbench.py offers A-D and stops at the first empty one
            if not _present(row.get(letter)):
                break
            options[letter] = row[letter]
        question = need(row, "question", where)
        if _present(row.get("hint")):
            question = f"{row['hint']}\n{question}"
        prompt = question + "".join(f"\n{k}. {v}" for k, v in options.items()) + f"\n{LETTER_ANSWER}"
        image = row.get("image") or ""
        if image.isdigit() and len(image) < 16:  # some TSVs point copies at their main row's image
            image = images.get(image) or ""
        answer = row.get("answer") if _present(row.get("answer")) else None
        meta = {"options": options, "group": index % MMBENCH_GROUP, "category": row.get("category"),
                "l2_category": row.get("l2-category", row.get("L2-category")), "split": row.get("split")}
        out.append(EvalQuestion("mmbench", index, "", prompt, None, answer, meta, image or None))
    return out


def _load_shapes(path: Path, annotations: str | Path | None, image_root: str | Path | None) -> list[EvalQuestion]:
    records = read_json(path, "shapes test split")
    if not isinstance(records, list):
        raise AlignTIError(f"{path.name}: expected a JSON list of shapes records")
    out = []
    for n, rec in enumerate(records):
        where = f"{path.name} record {n}"
        turns = need(rec, "conversations", where)
        human = next((t["value"] for t in turns if t.get("from") == "human"), None)
        if human is None:
            raise AlignTIError(f"{where}: no human turn in 'conversations'")
        # Only the first question is scored: question_type/answer describe that one.
        out.append(EvalQuestion("shapes", need(rec, "id", where), "", human.replace("<image>", "").strip(),
                                rec.get("image"), str(need(rec, "answer", where)),
                                {"question_type": need(rec, "question_type", where)}))
    return out


_LOADERS: dict[str, Callable[..., list[EvalQuestion]]] = {
    "gqa": _load_gqa, "textvqa": _load_textvqa, "pope": _load_pope, "mme": _load_mme,
    "scienceqa": _load_scienceqa, "mmbench": _load_mmbench, "shapes": _load_shapes,
}


def _with_keys(questions: list[EvalQuestion]) -> list[EvalQuestion]:
    """Key = question_id, or question_id + core question text where the id repeats."""
    counts = Counter(str(q.question_id) for q in questions)
    keyed = [replace(q, key=str(q.question_id) if counts[str(q.question_id)] == 1
                     else f"{q.question_id}#{question_core(q.benchmark, q.prompt)}") for q in questions]
    dup = next((k for k, c in Counter(q.key for q in keyed).items() if c > 1), None)
    if dup is not None:
        raise AlignTIError(f"two questions share id and text ({dup!r}); the question file has duplicates")
    return keyed


def load_questions(benchmark: str, questions: str | Path, annotations: str | Path | None = None,
                   image_root: str | Path | None = None) -> list[EvalQuestion]:
    """Read a benchmark's question file (and its ground truth) into `EvalQuestion`s, in file order."""
    if benchmark not in _LOADERS:
        raise AlignTIError(f"unknown benchmark {benchmark!r}; choose one of {', '.join(BENCHMARKS)}")
    path = Path(questions)
    if not path.is_file():
        raise AlignTIError(f"question file not found: {str(path)!r}")
    loaded = _LOADERS[benchmark](path, annotations, image_root)
    if not loaded:
        raise AlignTIError(f"{str(path)!r} holds no {benchmark} questions")
    return _with_keys(loaded)
