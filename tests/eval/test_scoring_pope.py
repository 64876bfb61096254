"""POPE metrics per split, on files in LLaVA's format (llava_pope_test.jsonl + coco/coco_pope_*.json)."""

import json

import pytest

from alignti.eval.formats import SHORT_ANSWER
from alignti.eval.questions import load_questions
from alignti.eval.scoring import score_pope

# (split, image, object, label, model output)
CASES = [
    ("random", "i1.jpg", "dog", "yes", "Yes."),
    ("random", "i1.jpg", "cat", "yes", "No, there is not."),
    ("random", "i2.jpg", "car", "no", "NO"),
    ("random", "i2.jpg", "bus", "no", "There is no dog."),
    ("adversarial", "i3.jpg", "cup", "yes", "yes"),
    ("adversarial", "i3.jpg", "fork", "no", "no"),
    ("adversarial", "i4.jpg", "bowl", "yes", "yes"),
    ("adversarial", "i4.jpg", "knife", "no", "Yes"),
]


def _files(tmp_path):
    coco = tmp_path / "coco"
    coco.mkdir()
    for split in ("random", "adversarial"):
        # Label files number their questions from 1; the jsonl below does not: the join is on
        # (image, question), not on ids or order.
        recs = [{"question_id": i + 1, "image": img, "text": f"Is there a {obj} in the image?", "label": lab}
                for i, (s, img, obj, lab, _) in enumerate(c for c in CASES if c[0] == split)]
        (coco / f"coco_pope_{split}.json").write_text("".join(json.dumps(r) + "\n" for r in recs[::-1]))
    rows = [{"question_id": 100 + i, "image": img, "category": s,
             "text": f"Is there a {obj} in the image?\n{SHORT_ANSWER}"} for i, (s, img, obj, _, _) in enumerate(CASES)]
    qfile = tmp_path / "llava_pope_test.jsonl"
    qfile.write_text("".join(json.dumps(r) + "\n" for r in rows))
    answers = [{"question_id": r["question_id"], "prompt": r["text"], "text": c[4]} for r, c in zip(rows, CASES)]
    return qfile, answers


def test_llava_rule(tmp_path):
    qfile, answers = _files(tmp_path)
    res = score_pope(load_questions("pope", qfile), answers, "llava")
    r, a = res["splits"]["random"], res["splits"]["adversarial"]
    # random: "Yes." -> yes; "No, there is not." -> "No" -> no; "NO" -> yes (only No/no/not count);
    # "There is no dog." -> no. preds y n y n vs labels y y n n: TP1 FN1 FP1 TN1
    assert r["accuracy"] == pytest.approx(50) and r["precision"] == pytest.approx(50)
    assert r["recall"] == pytest.approx(50) and r["f1"] == pytest.approx(50)
    assert r["yes_ratio"] == pytest.approx(50)  # 2 of 4 predictions are yes
    # adversarial: preds y n y y vs y n y n: TP2 TN1 FP1 FN0 -> acc 3/4, P 2/3, R 1, F1 0.8
    assert a["accuracy"] == pytest.approx(75) and a["precision"] == pytest.approx(200 / 3)
    assert a["recall"] == pytest.approx(100) and a["f1"] == pytest.approx(80)
    assert a["yes_ratio"] == pytest.approx(75)
    assert res["score"] == pytest.approx((50 + 80) / 2)  # F1 averaged over splits
    # pooled: TP3 FP2 FN1 TN2 -> P 3/5, R 3/4, F1 = 2*.6*.75/1.35 = 2/3; acc 5/8
    assert res["all"]["f1"] == pytest.approx(200 / 3) and res["all"]["accuracy"] == pytest.approx(62.5)


def test_lmms_eval_rule(tmp_path):
    qfile, answers = _files(tmp_path)
    res = score_pope(load_questions("pope", qfile), answers, "lmms-eval")
    r, a = res["splits"]["random"], res["splits"]["adversarial"]
    # random: only "no" (from "NO") is an exact yes/no; "yes." etc. are wrong and outside TP/FP/FN
    assert r["accuracy"] == pytest.approx(25)  # 1 of 4
    assert r["precision"] == 0 and r["recall"] == 0 and r["f1"] == 0  # no TP, empty denominators -> 0
    assert r["unparsed"] == 3
    assert r["yes_ratio"] == pytest.approx(50)  # lmms-eval's yes_ratio counts ground-truth yes
    # adversarial: y n y y (lower-cased) as under llava -> acc 75, F1 80; yes_ratio = 2/4 labels
    assert a["f1"] == pytest.approx(80) and a["yes_ratio"] == pytest.approx(50)
    # pooled: TP2 (adv) FP1 (adv "Yes") FN0 -> P 2/3, R 1, F1 0.8; correct 1 + 3 of 8
    assert res["all"]["f1"] == pytest.approx(80) and res["all"]["accuracy"] == pytest.approx(50)
    assert res["score"] == pytest.approx(80)  # lmms-eval's `pope` task: pooled F1


def test_coco_pope_file_is_a_question_file(tmp_path):
    # coco_pope_<split>.json holds question, image and label: LLaVA's jsonl is not needed.
    _files(tmp_path)
    questions = load_questions("pope", tmp_path / "coco" / "coco_pope_random.json")
    assert [(q.question_id, q.image, q.answer, q.meta["split"]) for q in questions] == [
        (4, "i2.jpg", "no", "random"), (3, "i2.jpg", "no", "random"), (2, "i1.jpg", "yes", "random"),
        (1, "i1.jpg", "yes", "random")]  # the file's own ids and order (written reversed above)
    assert questions[0].prompt == f"Is there a bus in the image?\n{SHORT_ANSWER}"
    outputs = {c[2]: c[4] for c in CASES}  # object -> model output
    answers = [{"question_id": q.question_id, "text": outputs[q.prompt.split()[3]]} for q in questions]
    r = score_pope(questions, answers, "llava")
    assert r["splits"]["random"]["f1"] == pytest.approx(50) and r["score"] == pytest.approx(50)
