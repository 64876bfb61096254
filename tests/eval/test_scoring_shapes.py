"""Shapes test split: the final-answer rule, exact match per question type, token F1 of descriptions."""

import json

import pytest

from alignti.eval.questions import load_questions
from alignti.eval.scoring import score_shapes
from alignti.eval.scoring.shapes import final_answer, token_f1

# (question type, question, gold answer, model output)
CASES = [
    ("color", "What colour is the square?", "red", "Red."),
    ("count", "How many circles are there?", "2", "two"),
    ("count", "How many red objects are there?", "3", "3 objects"),
    ("position", "Where is the blue circle?", "top left", "The top left"),
    ("existence", "Is there a green triangle?", "no", "Yes"),
    ("shape", "What shape is the red object?", "circle", "circles"),
]


def _test_json(tmp_path, with_follow_up=True):
    records = []
    for i, (qtype, q, a, _) in enumerate(CASES):
        conv = [{"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": a}]
        if with_follow_up and i == 0:  # a second turn is never scored
            conv += [{"from": "human", "value": "Is there a red square?"}, {"from": "gpt", "value": "yes"}]
        records.append({"id": f"shapes-{i:06d}", "image": f"images/{i:06d}.png", "conversations": conv,
                        "question_type": qtype, "answer": a, "target_box": None, "relevant_boxes": []})
    path = tmp_path / "test.json"
    path.write_text(json.dumps(records))
    return path


@pytest.mark.parametrize("scoring", ["llava", "lmms-eval"])
def test_score_shapes(tmp_path, scoring):
    questions = load_questions("shapes", _test_json(tmp_path))
    assert questions[0].prompt == "What colour is the square?"  # no <image>, no suffix
    answers = [{"question_id": q.question_id, "prompt": q.prompt, "text": c[3]} for q, c in zip(questions, CASES)]
    res = score_shapes(questions, answers, scoring)
    # "red." -> red ok; "two" -> 2 ok; "3 objects" no; "the top left" -> top left ok;
    # "yes" vs no; "circles" vs circle no -> 3 of 6
    assert res["score"] == pytest.approx(50)
    assert res["per_question_type"] == pytest.approx(
        {"color": 100, "count": 50, "existence": 0, "position": 100, "shape": 0})


def test_generated_corpus_scores_100_with_its_own_answers(tmp_path):
    from alignti.data.shapes import ShapesConfig, run_shapes

    run_shapes(ShapesConfig(out=str(tmp_path / "shapes"), n=25, seed=3, image_size=32, test_fraction=0.2))
    questions = load_questions("shapes", tmp_path / "shapes" / "test.json")
    assert len(questions) == 5  # 20% of 25, one per question type
    answers = [{"question_id": q.question_id, "text": q.answer.capitalize() + "."} for q in questions]
    res = score_shapes(questions, answers)
    assert res["score"] == 100.0 and len(res["per_question_type"]) == 5


# --- long answer styles --------------------------------------------------------------------


@pytest.mark.parametrize("qtype, text, final", [
    ("color", "The top right quadrant holds a yellow triangle. The answer is yellow.", "yellow"),
    ("color", "The triangle is yellow.", "yellow"),
    ("color", "the answer is Yellow", "yellow"),
    ("color", "The answer is red. The answer is blue.", "blue"),  # the last one counts
    ("shape", "The red object is a circle.", "circle"),  # the colour word is not a shape
    ("position", "The red circle is in the top left.", "top left"),
    ("position", "The top left quadrant holds a red circle.", "top left"),  # no "answer is": the sentence
    ("count", "There are two red objects.", "2"),
    ("count", "There is one circle.", "1"),
    ("count", "There are no circles.", "0"),
    ("existence", "No, there is no red circle.", "no"),
    ("existence", "Yes, there is an orange square.", "yes"),
    ("describe", "The object in the top left is a small yellow triangle.", "small yellow triangle"),
    ("describe", "a small yellow triangle", "small yellow triangle"),
    # Short answers are compared whole, as before: not a sentence (< 3 words or no final period).
    ("count", "3 objects", "3 objects"),
    ("count", "3 objects.", "3 objects"),
    ("position", "The top left", "top left"),
    ("color", "Red.", "red"),
    ("color", "The square is", "square is"),
    ("color", "Nothing I can see.", "nothing i can see"),  # a sentence without a colour stays whole
])
def test_final_answer_rule(qtype, text, final):
    assert final_answer(text, qtype) == final


def test_token_f1():
    assert token_f1("small red triangle", "small yellow triangle") == pytest.approx(2 / 3)
    assert token_f1("yellow triangle", "small yellow triangle") == pytest.approx(0.8)
    assert token_f1("", "") == 1.0 and token_f1("", "red") == 0.0 and token_f1("blue", "red") == 0.0


@pytest.fixture(scope="module")
def styled_questions(tmp_path_factory):
    """{style: {split: questions}} of one seed in every style (train too: more long answers)."""
    from alignti.data.shapes import ShapesConfig, run_shapes

    out = {}
    for style in ("short", "sentence", "reasoning", "mixed"):
        root = tmp_path_factory.mktemp(style)
        run_shapes(ShapesConfig(out=str(root), n=80, seed=4, image_size=32, answer_style=style))
        out[style] = {s: load_questions("shapes", root / f"{s}.json") for s in ("train", "test")}
    return out


def _own_answers(questions, edit=lambda q: q.answer):
    return [{"question_id": q.question_id, "text": edit(q)} for q in questions]


@pytest.mark.parametrize("style", ["short", "sentence", "reasoning", "mixed"])
def test_gold_answers_of_every_style_score_100(styled_questions, style):
    for split, questions in styled_questions[style].items():
        res = score_shapes(questions, _own_answers(questions))
        assert res["score"] == 100.0 and set(res["per_question_type"].values()) == {100.0}, (split, res)
        if style != "short":
            assert res["describe_exact_match"] == res["describe_token_f1"] == 100.0
        else:
            assert "describe" not in res["per_question_type"] and "describe_token_f1" not in res


def test_styles_reduce_to_the_short_answers(styled_questions):
    """The final answer of every long gold answer is the short corpus's answer to that question."""
    short = {q.question_id: q for s in styled_questions["short"].values() for q in s}
    for style in ("sentence", "reasoning", "mixed"):
        for q in [q for s in styled_questions[style].values() for q in s]:
            qtype = q.meta["question_type"]
            if qtype == "describe":
                assert final_answer(q.answer, qtype).split()[0] in ("small", "large")
                continue
            assert q.prompt == short[q.question_id].prompt
            assert final_answer(q.answer, qtype) == final_answer(short[q.question_id].answer, qtype) \
                == short[q.question_id].answer


def test_wrong_colour_in_reasoning_scores_0(styled_questions):
    questions = [q for s in styled_questions["reasoning"].values() for q in s if q.meta["question_type"] == "color"]
    assert len(questions) >= 10

    def recolour(q):
        gold = final_answer(q.answer, "color")
        wrong = "blue" if gold != "blue" else "red"
        return q.answer.replace(gold, wrong)  # facts and final answer both say the wrong colour

    res = score_shapes(questions, _own_answers(questions, recolour))
    assert res["score"] == 0.0 and res["per_question_type"] == {"color": 0.0}
    one = questions[0]
    gold = final_answer(one.answer, "color")
    right_final_wrong_facts = one.answer.replace(gold, "purple" if gold != "purple" else "red", 1)
    assert score_shapes([one], [{"question_id": one.question_id, "text": right_final_wrong_facts}])["score"] == 100.0


def test_descriptions_report_exact_match_and_token_f1_beside_the_headline(styled_questions):
    questions = styled_questions["sentence"]["test"]
    describe = [q for q in questions if q.meta["question_type"] == "describe"]
    assert describe

    def edit(q):  # every description loses its size word; everything else is right
        if q.meta["question_type"] != "describe":
            return q.answer
        return q.answer.replace(" small ", " ").replace(" large ", " ")

    res = score_shapes(questions, _own_answers(questions, edit))
    assert res["score"] == res["accuracy"] == 100.0  # descriptions are not in the headline
    assert res["per_question_type"]["describe"] == res["describe_exact_match"] == 0.0
    assert res["describe_token_f1"] == pytest.approx(80.0)  # "yellow triangle" vs "small yellow triangle"
    missing = score_shapes(questions, _own_answers([q for q in questions if q not in describe]))
    assert missing["describe_token_f1"] == 0.0 and missing["missing"] == len(describe)
