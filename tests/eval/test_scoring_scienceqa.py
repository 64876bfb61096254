"""ScienceQA letter parsing and image-subset accuracy, on files in LLaVA's format
(llava_test_CQM-A.json + problems.json + pid_splits.json)."""

import json

import pytest

from alignti.eval.formats import LETTER_ANSWER
from alignti.errors import AlignTIError
from alignti.eval.questions import load_questions
from alignti.eval.scoring import score_scienceqa
from alignti.eval.scoring.scienceqa import sqa_correct, sqa_parse

# pid: (choices, answer index, subject, has image, model output)
PROBLEMS = {
    "1": (["cat", "dog", "bird"], 1, "natural science", True, "B"),
    "2": (["yes", "no"], 0, "natural science", True, "The answer is A."),
    "3": (["x", "y", "z"], 2, "social science", True, "C."),
    "4": (["p", "q"], 1, "social science", True, "B."),
    "5": (["m", "n"], 0, "language science", False, "A. m"),
    "6": (["u", "v"], 0, "natural science", True, "A"),  # val split: not scored
}


@pytest.mark.parametrize("text, n, idx", [
    ("B", 3, 1), ("B. dog", 3, 1), ("The answer is B.", 3, 1), ("The answer is B, it is", 3, 1),
    ("The answer is B", 3, -1),          # the pattern needs one character after the letter
    ("B.", 3, -1), ("B.dog", 3, -1), ("(B)", 3, -1), ("b", 3, -1), (" B", 3, -1),
    ("C", 2, -1),                        # a letter beyond the choices
    ("The answer is A. The answer is B.", 3, -1),  # two matches -> FAILED
])
def test_llava_parse(text, n, idx):
    assert sqa_parse(text, n) == idx


@pytest.mark.parametrize("text, ok", [("B", True), ("B.", True), ("B. dog", True), (" B ", True),
                                      ("b", True), (" b\n", True),  # the whole output is compared lower-cased
                                      ("b.", False), ("b. dog", False),  # "X." needs an upper-case X
                                      ("The answer is B.", False), ("(B)", False), ("A.", False), ("a", False)])
def test_lmms_eval_rule(text, ok):
    # lmms-eval tasks/scienceqa/utils.py sqa_process_results
    assert sqa_correct(text, 1, 3, "lmms-eval") is ok


def _files(tmp_path):
    problems = {pid: {"question": f"Q{pid}", "choices": c, "answer": a, "hint": "", "subject": s,
                      "image": "image.png" if img else None, "split": "val" if pid == "6" else "test"}
                for pid, (c, a, s, img, _) in PROBLEMS.items()}
    (tmp_path / "problems.json").write_text(json.dumps(problems))
    (tmp_path / "pid_splits.json").write_text(json.dumps({"test": ["1", "2", "3", "4", "5"], "val": ["6"]}))
    records = []
    for pid, (choices, _, _, img, _) in PROBLEMS.items():
        opts = "\n".join(f"{'ABCDE'[i]}. {c}" for i, c in enumerate(choices))
        human = ("<image>\n" if img else "") + f"Q{pid}\n{opts}"
        rec = {"id": pid, "conversations": [{"from": "human", "value": human}, {"from": "gpt", "value": "A"}]}
        if img:
            rec["image"] = f"{pid}/image.png"
        records.append(rec)
    qfile = tmp_path / "llava_test_CQM-A.json"
    qfile.write_text(json.dumps(records))
    answers = [{"question_id": pid, "prompt": "p", "text": v[4]} for pid, v in PROBLEMS.items()]
    return qfile, answers


def test_loader(tmp_path):
    qfile, _ = _files(tmp_path)
    questions = load_questions("scienceqa", qfile)
    assert [q.key for q in questions] == ["1", "2", "3", "4", "5"]  # pid 6 is not in the test split
    assert questions[0].prompt == f"Q1\nA. cat\nB. dog\nC. bird\n{LETTER_ANSWER}"
    assert questions[4].image is None


def test_score_llava(tmp_path):
    qfile, answers = _files(tmp_path)
    res = score_scienceqa(load_questions("scienceqa", qfile), answers, "llava")
    # image subset 1-4: "B" ok, "The answer is A." ok, "C." no, "B." no -> 2/4
    assert res["score"] == pytest.approx(50) and res["n_image"] == 4
    assert res["accuracy_all"] == pytest.approx(60)  # + pid 5 "A. m" ok -> 3/5
    assert res["per_subject_image"] == pytest.approx({"natural science": 100, "social science": 0})


def test_score_lmms_eval(tmp_path):
    qfile, answers = _files(tmp_path)
    res = score_scienceqa(load_questions("scienceqa", qfile), answers, "lmms-eval")
    # image subset: "B" ok, "The answer is A." no, "C." ok, "B." ok -> 3/4
    assert res["score"] == pytest.approx(75)
    assert res["accuracy_all"] == pytest.approx(80)  # + "A. m" ok -> 4/5
    assert res["per_subject_image"] == pytest.approx({"natural science": 50, "social science": 100})


def test_problems_json_is_a_question_file(tmp_path):
    # problems.json + pid_splits.json hold everything: LLaVA's llava_test_CQM-A.json is not needed.
    qfile, answers = _files(tmp_path)
    llava, own = load_questions("scienceqa", qfile), load_questions("scienceqa", tmp_path / "problems.json")
    assert [(q.key, q.image, q.answer, q.meta) for q in own] == [(q.key, q.image, q.answer, q.meta) for q in llava]
    # The prompt as lmms-eval's scienceqa task (and LLaVA-1.5's converted file) writes it.
    assert own[0].prompt == f"Q1\nA. cat\nB. dog\nC. bird\n{LETTER_ANSWER}"
    for scoring in ("llava", "lmms-eval"):
        assert score_scienceqa(own, answers, scoring) == score_scienceqa(llava, answers, scoring)
    problems = json.loads((tmp_path / "problems.json").read_text())
    problems["1"]["hint"] = "Look at the map."
    (tmp_path / "problems.json").write_text(json.dumps(problems))
    first = load_questions("scienceqa", tmp_path / "problems.json")[0]
    assert first.prompt.startswith("Context: Look at the map.\nQ1\n")
    (tmp_path / "pid_splits.json").unlink()  # without it the train split would be scored too
    with pytest.raises(AlignTIError, match="pid_splits.json"):
        load_questions("scienceqa", tmp_path / "problems.json")
