"""GQA exact match, on files in LLaVA's GQA format (jsonl + testdev_balanced_questions.json)."""

import json

import pytest

from alignti.eval.formats import SHORT_ANSWER
from alignti.eval.questions import load_questions
from alignti.eval.scoring import score_gqa

GOLD = {  # qid: (answer, structural type)
    "201": ("yes", "verify"), "202": ("table", "query"), "203": ("t-shirt", "query"),
    "204": ("left", "choose"), "205": ("no", "verify"), "206": ("yes", "verify"),
}
OUTPUTS = {"201": "Yes.", "202": "The table", "203": "tshirt", "204": " left", "205": "no!", "206": "yes.."}


def _files(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    ann = {qid: {"answer": a, "question": f"Question {qid}?", "imageId": "n1", "isBalanced": True,
                 "types": {"structural": s, "semantic": "attr", "detailed": "x"}} for qid, (a, s) in GOLD.items()}
    (data / "testdev_balanced_questions.json").write_text(json.dumps(ann))
    qfile = tmp_path / "llava_gqa_testdev_balanced.jsonl"
    rows = [{"question_id": qid, "image": "n1.jpg", "text": f"Question {qid}?\n{SHORT_ANSWER}", "category": "default"}
            for qid in GOLD]
    qfile.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return qfile


def test_loader_keeps_single_suffix(tmp_path):
    questions = load_questions("gqa", _files(tmp_path))  # finds data/testdev_balanced_questions.json
    assert [q.answer for q in questions] == [a for a, _ in GOLD.values()]
    assert all(q.prompt.count(SHORT_ANSWER) == 1 for q in questions)


def test_llava_rule(tmp_path):
    questions = load_questions("gqa", _files(tmp_path))
    answers = [{"question_id": k, "text": v} for k, v in OUTPUTS.items()]
    res = score_gqa(questions, answers, "llava")
    # rstrip('.') + lower, then ==: "yes" ok, "the table" no, "tshirt" no, " left" no (no strip),
    # "no!" no, "yes" ok -> 2 / 6
    assert res["score"] == pytest.approx(100 * 2 / 6)
    # verify: 201 ok, 205 no, 206 ok -> 2/3; query: 0/2; choose: 0/1
    assert res["per_structural_type"] == pytest.approx({"choose": 0.0, "query": 0.0, "verify": 100 * 2 / 3})


def test_lmms_eval_rule(tmp_path):
    questions = load_questions("gqa", _files(tmp_path))
    answers = [{"question_id": k, "text": v} for k, v in OUTPUTS.items()]
    res = score_gqa(questions, answers, "lmms-eval")
    # strip, lower, drop punctuation on both sides: "yes" ok, "the table" no (articles stay),
    # "tshirt" == "tshirt" ok, "left" ok, "no" ok, "yes" ok -> 5 / 6
    assert res["score"] == pytest.approx(100 * 5 / 6)


def test_gqa_own_questions_file_is_a_question_file(tmp_path):
    # testdev_balanced_questions.json holds question, image and answer: LLaVA's jsonl is not needed.
    llava = load_questions("gqa", _files(tmp_path))
    own = load_questions("gqa", tmp_path / "data" / "testdev_balanced_questions.json")
    assert own == llava  # same ids, keys, prompts and images (n1 -> n1.jpg)
    assert [(q.answer, q.meta) for q in own] == [(q.answer, q.meta) for q in llava]
    answers = [{"question_id": k, "text": v} for k, v in OUTPUTS.items()]
    assert score_gqa(own, answers)["score"] == score_gqa(llava, answers)["score"]
