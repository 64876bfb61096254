"""MME acc / acc+ / perception / cognition, on files in LLaVA's format (llava_mme.jsonl +
MME_Benchmark_release_version with its per-image txt answer files)."""

import json

import pytest

from alignti.eval.formats import SHORT_ANSWER
from alignti.eval.questions import load_questions
from alignti.eval.scoring import score_mme
from alignti.eval.scoring.mme import mme_parse

YN = "Please answer yes or no."
# (category, image file, question, gold, model output)
CASES = [
    ("existence", "0001.png", "Is there a dog in this image?", "Yes", "Yes"),
    ("existence", "0001.png", "Is there a cat in this image?", "No", "No."),
    ("existence", "0002.png", "Is there a car in this image?", "Yes", "y"),
    ("existence", "0002.png", "Is there a bus in this image?", "No", "  no"),
    ("artwork", "10002.jpg", "Is this artwork created by Monet?", "Yes", "Yes, it is."),
    ("artwork", "10002.jpg", "Is this artwork created by Picasso?", "No", "Not at all"),
    ("code_reasoning", "0020.png", "Will the code print 3?", "Yes", "The answer is yes"),
    ("code_reasoning", "0020.png", "Will the code print 4?", "No", "no"),
]


def _files(tmp_path):
    root = tmp_path / "MME_Benchmark_release_version"
    for cat, img, q, gold, _ in CASES:
        # artwork-style categories keep images/ and questions_answers_YN/; the others are flat.
        qa_dir = root / cat
        if cat == "artwork":
            (root / cat / "images").mkdir(parents=True, exist_ok=True)
            qa_dir = root / cat / "questions_answers_YN"
        qa_dir.mkdir(parents=True, exist_ok=True)
        txt = qa_dir / (img.rsplit(".", 1)[0] + ".txt")
        spaces = "  " if cat == "artwork" else " "  # some MME files have two spaces before the YN prompt
        with txt.open("a") as f:
            f.write(f"{q}{spaces}{YN}\t{gold}\n")
    rows = [{"question_id": f"{cat}/{img}", "image": f"{cat}/{img}", "text": f"{q} {YN}\n{SHORT_ANSWER}"}
            for cat, img, q, _, _ in CASES]
    qfile = tmp_path / "llava_mme.jsonl"
    qfile.write_text("".join(json.dumps(r) + "\n" for r in rows))
    answers = [{"question_id": r["question_id"], "prompt": r["text"], "text": c[4]} for r, c in zip(rows, CASES)]
    return qfile, answers


@pytest.mark.parametrize("text, llava, lmms", [
    ("Yes", "yes", "yes"), ("No.", "no", "no"), ("y", "other", "yes"), ("N", "other", "no"),
    ("   yes", "other", "yes"),   # llava looks at the first 4 characters without stripping
    ("...Yes", "other", "yes"),   # lmms-eval deletes every "." first
    ("Not at all", "no", "no"), ("The answer is yes", "other", "other"),
    ("Ok no", "other", "other"),  # "no" starts at the 4th character: outside the 4-character window
])
def test_parse(text, llava, lmms):
    assert mme_parse(text, "llava") == llava
    assert mme_parse(text, "lmms-eval") == lmms


def test_llava_rule(tmp_path):
    qfile, answers = _files(tmp_path)
    questions = load_questions("mme", qfile)  # finds MME_Benchmark_release_version next to the file
    assert [q.answer for q in questions] == [c[3].lower() for c in CASES]
    res = score_mme(questions, answers, "llava")
    ex, art, code = (res["subtasks"][k] for k in ("existence", "artwork", "code_reasoning"))
    # existence: ok, ok, "y" -> other (wrong), "  no" -> no (ok): acc 3/4 = 75;
    # image 0001 both right, 0002 not: acc+ 1/2 = 50 -> 125
    assert (ex["acc"], ex["acc_plus"], ex["score"], ex["other"]) == pytest.approx((75, 50, 125, 1))
    # artwork: "yes, it is." -> yes; "not at all" -> no: 100 + 100
    assert art["score"] == pytest.approx(200)
    # code_reasoning: "the answer is yes" -> other; "no" ok: acc 50, acc+ 0
    assert code["score"] == pytest.approx(50)
    assert res["perception"] == pytest.approx(325) and res["cognition"] == pytest.approx(50)
    assert res["score"] == pytest.approx(325) and res["total"] == pytest.approx(375)
    assert res["perception_percent"] == pytest.approx(16.25)  # 325 / 2000 * 100


def test_lmms_eval_rule(tmp_path):
    qfile, answers = _files(tmp_path)
    res = score_mme(load_questions("mme", qfile), answers, "lmms-eval")
    # existence: "y" now counts as yes -> 4/4 and both images -> 100 + 100
    assert res["subtasks"]["existence"]["score"] == pytest.approx(200)
    assert res["perception"] == pytest.approx(400)  # + artwork 200
    assert res["cognition"] == pytest.approx(50)    # "The answer is yes" is still "other"
