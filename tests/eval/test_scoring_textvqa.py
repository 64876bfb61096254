"""TextVQA: EvalAI normalisation and VQA accuracy, on files in LLaVA's TextVQA format."""

import json

import pytest

from alignti.eval.formats import SHORT_ANSWER
from alignti.eval.questions import load_questions
from alignti.eval.scoring import score_textvqa
from alignti.eval.scoring.vqa import normalize_vqa_answer, vqa_accuracy


@pytest.mark.parametrize("raw, expected", [
    ("Two dogs.", "2 dogs"),            # number word -> digit, final period dropped
    ("The Coca-Cola", "coca cola"),     # article dropped, "-" inside a word -> space
    ("a - b", "b"),                     # "-" next to a space is deleted; "a" is an article
    ("Dont walk", "don't walk"),        # contraction restored
    ("3.5", "3.5"),                     # a period before a digit stays
    ("Yes!", "yes"),
    ("McDonald's", "mcdonald 's"),      # "'s" is split off, not removed
    ("none", "0"),
])
def test_normalisation(raw, expected):
    assert normalize_vqa_answer(raw) == expected


def test_accuracy_leave_one_out():
    # 3 of 10 humans said "x": leaving out one of those 3 leaves 2 matches (2/3); leaving out any
    # of the other 7 leaves 3 (min(3/3, 1) = 1): (3 * 2/3 + 7 * 1) / 10 = 0.9
    assert vqa_accuracy("x", ["x"] * 3 + ["y"] * 7) == pytest.approx(0.9)
    assert vqa_accuracy("x", ["x"] * 10) == pytest.approx(1.0)
    assert vqa_accuracy("z", ["x"] * 10) == 0.0


def _fixture(tmp_path):
    ann = {"dataset_name": "textvqa", "dataset_version": "0.5.1", "data": [
        {"image_id": "aaa", "question_id": 101, "question": "what brand is this?",
         "answers": ["nokia"] * 2 + ["nokia phone"] * 8},
        {"image_id": "aaa", "question_id": 102, "question": "how many people?",
         "answers": ["2"] * 3 + ["two"] + ["3"] * 6},
        {"image_id": "bbb", "question_id": 103, "question": "what is written?", "answers": ["stop"] * 10},
        {"image_id": "ccc", "question_id": 104, "question": "what does the sign say?",
         "answers": ["don't walk"] * 3 + ["walk"] * 7},
    ]}
    (tmp_path / "TextVQA_0.5.1_val.json").write_text(json.dumps(ann))
    # LLaVA's file: question_id is the image id (so "aaa" repeats), OCR tokens on line 2.
    lines = [("aaa", "What brand is this?", "nokia, 3310"), ("aaa", "How many people?", "exit"),
             ("bbb", "What is written?", "stop"), ("ccc", "What does the sign say?", "dont, walk")]
    rows = [{"question_id": qid, "image": f"{qid}.jpg", "category": "default",
             "text": f"{q}\nReference OCR token: {ocr}\n{SHORT_ANSWER}"} for qid, q, ocr in lines]
    qfile = tmp_path / "llava_textvqa_val_v051_ocr.jsonl"
    qfile.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return qfile, rows


@pytest.mark.parametrize("scoring", ["llava", "lmms-eval"])
def test_score_textvqa(tmp_path, scoring):
    qfile, rows = _fixture(tmp_path)
    questions = load_questions("textvqa", qfile)
    assert len({q.key for q in questions}) == 4  # "aaa" twice, told apart by the question
    outs = ["Nokia.", "Two", "The sign says stop", "Dont walk"]
    # Answers in a different order than the questions: matching is by id + question text.
    answers = [{"question_id": r["question_id"], "prompt": r["text"], "text": t} for r, t in zip(rows, outs)][::-1]
    res = score_textvqa(questions, answers, scoring)
    # q1: "nokia" matches 2 of 10: (2 * 1/3 + 8 * 2/3) / 10 = 0.6
    # q2: "two" -> "2" matches 4 of 10 ("2" x3 + "two"): every subset keeps >= 3 -> 1.0
    # q3: "sign says stop" != "stop" -> 0
    # q4: "dont walk" -> "don't walk" matches 3: (3 * 2/3 + 7 * 1) / 10 = 0.9
    # mean = (0.6 + 1 + 0 + 0.9) / 4 = 0.625 (both modes: lmms-eval uses the same processor)
    assert res["score"] == pytest.approx(62.5)
    assert res["n_answered"] == 4 and res["missing"] == 0


def test_missing_answer_scores_zero(tmp_path):
    qfile, rows = _fixture(tmp_path)
    questions = load_questions("textvqa", qfile)
    answers = [{"question_id": rows[0]["question_id"], "prompt": rows[0]["text"], "text": "nokia phone"}]
    res = score_textvqa(questions, answers)
    # q1 "nokia phone" matches 8: every subset keeps >= 7 -> 1.0; the 3 others missing -> 0: 1/4
    assert res["score"] == pytest.approx(25.0)
    assert res["missing"] == 3
