"""Shapes test split: exact match after normalisation, per question type."""

import json

import pytest

from alignti.eval.questions import load_questions
from alignti.eval.scoring import score_shapes

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
