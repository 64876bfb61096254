"""Answer styles of the shapes corpus: the same answer as a word, a sentence or a short reasoning.

`short` is the corpus's original form ("yellow", "2", "top left", "yes", "a small yellow
triangle"). `sentence` says it in one sentence ("The triangle is yellow."). `reasoning` first
states where each relevant object is, one sentence per object in quadrant order ("The top right
quadrant holds a yellow triangle."), or that no quadrant holds one, and ends with "The answer
is <short answer>." Only the objects the question is about (its `relevant` objects) are
mentioned, so every word of an answer follows from the question and the image.

The final answer of every style reduces to the short one under the eval rule of
`alignti.eval.scoring.shapes` (docs/eval.md); the long forms use no randomness, so a question
gets the same text in a given style every time (`mixed` picks the style in `shapes.py`).
"""

from __future__ import annotations

from alignti.data.shapes_questions import DESCRIBE, Question
from alignti.data.shapes_render import ShapeObject

ANSWER_STYLES = ("short", "sentence", "reasoning", "mixed")
MIXED_STYLES = ("short", "sentence", "reasoning")  # what `mixed` draws from, per question
_COUNT_WORDS = ("no", "one", "two", "three", "four")


def _a(phrase: str) -> str:
    """The phrase with its indefinite article: "a red circle", "an orange square"."""
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _holds(obj: ShapeObject) -> str:
    return f"The {obj.position} quadrant holds {_a(f'{obj.color} {obj.shape}')}."


def _counted(q: Question) -> str:
    """The noun a count question counts, singular: "red object" or "circle"."""
    return f"{q.color} object" if q.color else str(q.shape)


def sentence_answer(q: Question) -> str:
    """The answer as one sentence that names what the question asks about."""
    if q.qtype == "color":
        return f"The {q.shape} is {q.answer}."
    if q.qtype == "shape":
        return f"The {q.color} object is {_a(q.answer)}."
    if q.qtype == "position":
        return f"The {q.color} {q.shape} is in the {q.answer}."
    if q.qtype == "count":
        k = len(q.relevant)
        return f"There is one {_counted(q)}." if k == 1 else f"There are {_COUNT_WORDS[k]} {_counted(q)}s."
    if q.qtype == "existence":
        thing = f"{q.color} {q.shape}"
        return f"Yes, there is {_a(thing)}." if q.relevant else f"No, there is no {thing}."
    if q.qtype == DESCRIBE:
        return f"The object in the {q.target.position} is {q.answer}."
    raise ValueError(f"unknown question type {q.qtype!r}")


def reasoning_answer(q: Question) -> str:
    """Where each relevant object is (or that there is none), then "The answer is <short>."."""
    if q.qtype == DESCRIBE:
        facts = f"The {q.target.position} quadrant holds {q.answer}."  # its size is relevant here
    elif q.relevant:
        facts = " ".join(_holds(o) for o in q.relevant)
    elif q.qtype == "count":
        facts = f"No quadrant holds {_a(_counted(q))}."
    elif q.qtype == "existence":
        facts = f"No quadrant holds {_a(f'{q.color} {q.shape}')}."
    else:
        raise ValueError(f"a {q.qtype!r} question without a relevant object")
    return f"{facts} The answer is {q.answer}."


def styled_answer(q: Question, style: str) -> str:
    """The gpt text of `q` in `style` (one of MIXED_STYLES)."""
    if style == "short":
        return q.answer
    if style == "sentence":
        return sentence_answer(q)
    if style == "reasoning":
        return reasoning_answer(q)
    raise ValueError(f"unknown answer style {style!r}")
