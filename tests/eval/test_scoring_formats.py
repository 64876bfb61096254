"""Answers JSONL, answer-to-question matching, and loader errors."""

import json

import pytest
from PIL import Image

from alignti.errors import AlignTIError
from alignti.eval.formats import EvalQuestion, load_answers, open_image, with_suffix
from alignti.eval.questions import load_questions
from alignti.eval.scoring import match_answers, score_benchmark, score_gqa
from alignti.eval.scoring.matching import align


def _q(qid, prompt="q", key=None, answer="yes", bench="gqa"):
    return EvalQuestion(bench, qid, key or str(qid), prompt, "x.jpg", answer)


def test_load_answers_tolerates_a_cut_last_line(tmp_path):
    path = tmp_path / "answers.jsonl"
    path.write_text('{"question_id": 1, "text": "yes"}\n\n{"question_id": 2, "text": "no"}\n{"question_id": 3, "te')
    assert [r["question_id"] for r in load_answers(path)] == [1, 2]


@pytest.mark.parametrize("body, msg", [
    ('{"question_id": 1, "te\n{"question_id": 2, "text": "no"}\n', "line 1: not JSON"),
    ('{"question_id": 1}\n', "record 1: needs 'question_id' and a string 'text'"),
    ('[1, 2]\n', "line 1: not a JSON object"),
])
def test_load_answers_rejects_bad_lines(tmp_path, body, msg):
    path = tmp_path / "answers.jsonl"
    path.write_text(body)
    with pytest.raises(AlignTIError, match=msg):
        load_answers(path)


def test_load_answers_not_utf8_is_one_error(tmp_path):
    path = tmp_path / "answers.jsonl"
    path.write_bytes('{"question_id": 1, "text": "caf\u00e9"}\n'.encode("latin-1"))
    with pytest.raises(AlignTIError, match=r"answers file .* is not UTF-8 text \(byte 0xe9 at offset 31\)"):
        load_answers(path)
    with pytest.raises(AlignTIError, match="cannot be read"):
        load_answers(tmp_path)  # a directory


def test_matching_counts_missing_strays_and_repeats():
    questions = [_q(1), _q(2), _q(3)]
    answers = [{"question_id": 1, "text": "no"}, {"question_id": 1, "text": "yes"},  # repeat: last wins
               {"question_id": "2", "text": "yes"},                                 # id as string still matches
               {"question_id": 9, "text": "yes"}]                                   # no such question
    m = align(questions, answers)
    assert m.outputs == ["yes", "yes", None]
    assert m.counts() == {"n_questions": 3, "n_answered": 2, "missing": 1, "unmatched_answers": 1,
                          "duplicate_answers": 1}
    assert set(match_answers(questions, answers)) == {"1", "2"}
    # 2 of 3 right ("yes"), the missing one counts as wrong
    assert score_gqa(questions, answers)["score"] == pytest.approx(100 * 2 / 3)


def test_unknown_mode_and_benchmark():
    with pytest.raises(AlignTIError, match="unknown scoring"):
        score_gqa([_q(1)], [], scoring="vlmevalkit")
    with pytest.raises(AlignTIError, match="unknown benchmark"):
        score_benchmark("vqav2", [_q(1)], [])
    with pytest.raises(AlignTIError, match="not 'pope'"):
        score_benchmark("pope", [_q(1)], [])


def test_missing_ground_truth_is_a_clear_error(tmp_path):
    qfile = tmp_path / "llava_gqa_testdev_balanced.jsonl"
    qfile.write_text(json.dumps({"question_id": "1", "image": "a.jpg", "text": "Q?"}) + "\n")
    with pytest.raises(AlignTIError, match=r"questions.json\) is needed .*; pass it with --annotations"):
        load_questions("gqa", qfile)
    with pytest.raises(AlignTIError, match="question file not found"):
        load_questions("gqa", tmp_path / "nope.jsonl")


def test_suffix_added_once():
    assert with_suffix("Is it red?", "Answer briefly.") == "Is it red?\nAnswer briefly."
    assert with_suffix("Is it red?\nAnswer briefly.", "Answer briefly.") == "Is it red?\nAnswer briefly."


def test_open_image_stays_under_root(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    Image.new("RGB", (2, 2), (0, 0, 255)).save(root / "a.png")
    Image.new("RGB", (2, 2)).save(tmp_path / "secret.png")
    assert open_image(EvalQuestion("gqa", 1, "1", "q", "a.png", "x"), root).getpixel((0, 0)) == (0, 0, 255)
    with pytest.raises(AlignTIError, match="outside the image root"):
        open_image(EvalQuestion("gqa", 1, "1", "q", "../secret.png", "x"), root)
    with pytest.raises(AlignTIError, match="not found"):
        open_image(EvalQuestion("gqa", 1, "1", "q", "b.png", "x"), root)
