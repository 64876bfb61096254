"""MMBench option parsing and circular evaluation, on a TSV in MMBench's format
(mmbench_dev_20230712.tsv: circular copies at index k * 1e6 + i, inline base64 images)."""

import base64
import csv
import io

import pytest
from PIL import Image

from alignti.errors import AlignTIError
from alignti.eval.formats import LETTER_ANSWER, open_image
from alignti.eval.questions import load_questions
from alignti.eval.scoring import score_mmbench
from alignti.eval.scoring.mmbench import mmbench_parse

OPTS = {"A": "cat", "B": "dog", "C": "red car", "D": "fish"}


@pytest.mark.parametrize("text, llava, lmms", [
    ("B", "B", "B"), ("B.", "B", "B"), ("(B)", "B", "B"), ("B. dog", "B", "B"),
    ("The answer is B.", "B", "B"),
    ("[B]", "B", "B"),                  # lmms-eval: no [X] form, no option text; its fallback finds "B"
    ("B, C", None, "C"),                # two letters for VLMEvalKit; lmms-eval sees one bare "C"
    ("A dog is on the grass", "A", "B"),  # lmms-eval reads "A" as an article, then matches "dog"
    ("It is a red car", "C", "C"),      # no letter: the option text decides
    ("Cannot determine the answer", "Z", "C"),  # VLMEvalKit: reject "Z"; lmms-eval's fallback: any "C"
    ("cat or dog", None, None),         # two option texts and no capital letter: unparseable
    # lmms-eval's fallback for what can_infer leaves (extract_mcq_answer), in its priority order:
    ("Answer:B", "B", "B"),             # VLMEvalKit splits at ":"; lmms-eval: a letter ending the output
    ("I think it's B. Actually, it's C.", None, "C"),  # ending the output beats "X."
    ("Option B is wrong, so my answer is D then", None, "D"),  # after "answer is" beats a bare "B"
    ("(B) or (C)", None, "C"),          # the same form twice: the later one wins
    ("Dunno", None, "D"),               # nothing else: the last option letter anywhere
    ("Failed to obtain answer via API", None, "A"),  # only its option stage skips this phrase
])
def test_parse(text, llava, lmms):
    assert mmbench_parse(text, dict(OPTS), "llava") == llava
    assert mmbench_parse(text, dict(OPTS), "lmms-eval") == lmms


def _png_b64(color):
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), color).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


# (index, options, answer, category, image, model output)
ROWS = [
    # group 0: four rotations, all answered right under both rules
    (0, ["cat", "dog", "bird", "fish"], "B", "attribute", _png_b64("red"), "B"),
    (1000000, ["dog", "bird", "fish", "cat"], "A", "attribute", "0", "The answer is A."),
    (2000000, ["bird", "fish", "cat", "dog"], "D", "attribute", "0", "(D)"),
    (3000000, ["fish", "cat", "dog", "bird"], "C", "attribute", "0", "C. dog"),
    # group 1: three options (D empty); llava misses rotation 2, lmms-eval misses rotation 0
    (1, ["dog", "cat", "horse", "nan"], "A", "action", _png_b64("blue"), "[A]"),
    (1000001, ["cat", "horse", "dog", "nan"], "C", "action", "1", "C"),
    (2000001, ["horse", "dog", "cat", "nan"], "B", "action", "1", "A dog is running on the grass"),
    # group 2: a single row; "B, C" is two letters (llava: unparsed) or "C" (lmms-eval)
    (2, ["red", "green", "blue", "yellow"], "C", "attribute", _png_b64("green"), "B, C"),
    # group 3: a single row answered with a reject phrase
    (3, ["the sun", "the moon", "a star", "a cloud"], "A", "action", _png_b64("white"),
     "Cannot determine the answer"),
]


def _tsv(tmp_path, with_answer=True):
    cols = ["index", "question", "hint", "A", "B", "C", "D"] + (["answer"] if with_answer else []) + \
        ["category", "source", "l2-category", "comment", "split", "image"]
    path = tmp_path / "mmbench_dev_20230712.tsv"
    with path.open("w", newline="") as f:
        w = csv.writer(f, delimiter="\t")
        w.writerow(cols)
        for idx, opts, ans, cat, img, _ in ROWS:
            hint = "Look closely." if idx == 0 else "nan"
            row = [idx, f"Question {idx % 1000000}?", hint, *opts] + ([ans] if with_answer else []) + \
                [cat, "src", "l2", "nan", "dev", img]
            w.writerow(row)
    return path


def _answers():
    return [{"question_id": idx, "prompt": "p", "text": out} for idx, *_, out in ROWS]


def test_loader(tmp_path):
    questions = load_questions("mmbench", _tsv(tmp_path))
    first = questions[0]
    assert first.prompt == ("Look closely.\nQuestion 0?\nA. cat\nB. dog\nC. bird\nD. fish\n" + LETTER_ANSWER)
    assert list(questions[4].meta["options"]) == ["A", "B", "C"]  # "nan" option dropped
    assert questions[1].meta["group"] == 0
    # A circular copy whose image column names its main row gets that row's image.
    assert open_image(questions[1], None).getpixel((0, 0)) == (255, 0, 0)


def test_circular_llava(tmp_path):
    res = score_mmbench(load_questions("mmbench", _tsv(tmp_path)), _answers(), "llava")
    # groups: 0 all right; 1 row 2000001 read as "A" (wrong); 2 unparsed; 3 "Z" -> 1 of 4
    assert res["score"] == pytest.approx(25) and res["n_groups"] == 4
    # main rows 0, 1, 2, 3: right, right ("[A]"), unparsed, Z -> 2 of 4
    assert res["vanilla_accuracy"] == pytest.approx(50)
    assert res["per_category"] == pytest.approx({"action": 0, "attribute": 50})  # attribute: groups 0 ok, 2 not
    assert res["unparsed"] == 1


def test_circular_lmms_eval(tmp_path):
    res = score_mmbench(load_questions("mmbench", _tsv(tmp_path)), _answers(), "lmms-eval")
    # mmbench_en_dev_static. groups: 0 right; 1 right (row 1 "[A]": A only through the fallback);
    # 2 "C" right; 3 the fallback reads "Cannot ..." as C (wrong) -> 3 of 4
    assert res["score"] == pytest.approx(75)
    assert res["vanilla_accuracy"] == pytest.approx(75)  # main rows: right, right, right, wrong
    assert res["per_category"] == pytest.approx({"action": 50, "attribute": 100})
    assert res["unparsed"] == 0


def test_llava_all_rounds_extra_rounds_are_ignored(tmp_path):
    extra = [{"question_id": 0, "round_id": 1, "prompt": "p", "text": "A"}]  # a rotation LLaVA made itself
    res = score_mmbench(load_questions("mmbench", _tsv(tmp_path)), _answers() + extra, "llava")
    assert res["score"] == pytest.approx(25) and res["duplicate_answers"] == 0


def test_missing_rotation_fails_the_group(tmp_path):
    answers = [a for a in _answers() if a["question_id"] != 3000000]
    res = score_mmbench(load_questions("mmbench", _tsv(tmp_path)), answers, "llava")
    assert res["score"] == pytest.approx(0) and res["missing"] == 1  # group 0 now incomplete


def test_test_split_has_no_answers(tmp_path):
    questions = load_questions("mmbench", _tsv(tmp_path, with_answer=False))
    with pytest.raises(AlignTIError, match="no 'answer' column"):
        score_mmbench(questions, _answers())
