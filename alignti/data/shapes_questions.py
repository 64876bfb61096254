"""Questions of the shapes corpus: scenes built around a question type, follow-ups, descriptions.

Every function draws from the `random.Random` it is given, in a fixed order, so a record's
scene and questions depend only on that generator's seed. The answer held here is the short
one ("red", "2", "a small yellow triangle"); `shapes_answers.py` writes the long styles.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass

from alignti.data.shapes_render import COLORS, SHAPES, ShapeObject, place_objects, size_word

QUESTION_TYPES = ("color", "shape", "position", "count", "existence")
DESCRIBE = "describe"  # only in the long answer styles, as records of their own
# Two phrasings per question keep some variety while the vocabulary stays tiny (the demo's
# tokenizer is trained on this corpus).
TEMPLATES: dict[str, tuple[str, ...]] = {
    "color": ("What colour is the {shape}?", "Which colour is the {shape}?"),
    "shape": ("What shape is the {color} object?", "Which shape is the {color} object?"),
    "position": ("Where is the {color} {shape}?", "Where is the {color} {shape} in the image?"),
    "count_color": ("How many {color} objects are there?", "How many {color} objects are in the image?"),
    "count_shape": ("How many {shape}s are there?", "How many {shape}s are in the image?"),
    "existence": ("Is there a {color} {shape}?", "Is there a {color} {shape} in the image?"),
    DESCRIBE: ("Describe the object in the {position}.", "What is the object in the {position}?"),
}


@dataclass(frozen=True)
class Question:
    """One question about a scene; `target` is the single object the answer depends on, if any.

    `color` / `shape` are the attributes the question text names (None where it names none):
    a count question names one of them, an existence question both.
    """

    qtype: str
    text: str
    answer: str
    target: ShapeObject | None
    relevant: tuple[ShapeObject, ...]
    color: str | None = None
    shape: str | None = None

    def meta(self, answer: str) -> dict:
        """The grounding annotation of one turn whose gpt text is `answer`."""
        return {"question_type": self.qtype, "answer": answer,
                "target_box": list(self.target.box) if self.target else None,
                "relevant_boxes": [list(o.box) for o in self.relevant]}


def _ask_color(rng: random.Random, target: ShapeObject) -> Question:
    return Question("color", rng.choice(TEMPLATES["color"]).format(shape=target.shape), target.color,
                    target, (target,), shape=target.shape)


def _ask_shape(rng: random.Random, target: ShapeObject) -> Question:
    return Question("shape", rng.choice(TEMPLATES["shape"]).format(color=target.color), target.shape,
                    target, (target,), color=target.color)


def _ask_position(rng: random.Random, target: ShapeObject) -> Question:
    text = rng.choice(TEMPLATES["position"]).format(color=target.color, shape=target.shape)
    return Question("position", text, target.position, target, (target,), target.color, target.shape)


def _ask_count(rng: random.Random, objects: list[ShapeObject], by: str, value: str) -> Question:
    relevant = tuple(o for o in objects if getattr(o, by) == value)
    text = rng.choice(TEMPLATES[f"count_{by}"]).format(**{by: value})
    return Question("count", text, str(len(relevant)), relevant[0] if len(relevant) == 1 else None, relevant,
                    **{by: value})


def _ask_existence(rng: random.Random, objects: list[ShapeObject], color: str, shape: str) -> Question:
    relevant = tuple(o for o in objects if o.color == color and o.shape == shape)
    text = rng.choice(TEMPLATES["existence"]).format(color=color, shape=shape)
    return Question("existence", text, "yes" if relevant else "no", relevant[0] if relevant else None, relevant,
                    color, shape)


def describe_question(rng: random.Random, objects: list[ShapeObject], image_size: int) -> Question:
    """"Describe the object in the top left." -> "a small yellow triangle", about a random object."""
    target = rng.choice(objects)
    text = rng.choice(TEMPLATES[DESCRIBE]).format(position=target.position)
    answer = f"a {size_word(target.box, image_size)} {target.color} {target.shape}"
    return Question(DESCRIBE, text, answer, target, (target,), target.color, target.shape)


def _specs(rng: random.Random, fixed: list[tuple[str, str]], colors: list[str], shapes: list[str],
           exclude: tuple[str, str] | None = None) -> list[tuple[str, str]]:
    """`fixed` (color, shape) pairs plus random distinct distractors from colors x shapes; 2-4 in all."""
    n_obj = rng.randint(max(2, len(fixed)), 4)
    pool = [(c, s) for c in colors for s in shapes if (c, s) not in fixed and (c, s) != exclude]
    return fixed + rng.sample(pool, n_obj - len(fixed))


def first_question(rng: random.Random, qtype: str, variant: int,
                   image_size: int) -> tuple[list[ShapeObject], Question]:
    """Scene built around a question of `qtype`; `variant` (the block index) balances yes/no and counts."""
    colors, shapes = list(COLORS), list(SHAPES)
    color, shape = rng.choice(colors), rng.choice(shapes)
    if qtype == "color":  # the asked shape must be unique: distractors use the other shapes
        specs = _specs(rng, [(color, shape)], colors, [s for s in shapes if s != shape])
    elif qtype == "shape":  # the asked colour must be unique
        specs = _specs(rng, [(color, shape)], [c for c in colors if c != color], shapes)
    elif qtype == "position":
        specs = _specs(rng, [(color, shape)], colors, shapes)
    elif qtype == "count":
        k, by = variant % 4, ("color", "shape")[(variant // 4) % 2]
        if by == "color":
            fixed = [(color, s) for s in rng.sample(shapes, k)]
            specs = _specs(rng, fixed, [c for c in colors if c != color], shapes)
        else:
            fixed = [(c, shape) for c in rng.sample(colors, k)]
            specs = _specs(rng, fixed, colors, [s for s in shapes if s != shape])
        objects = place_objects(rng, specs, image_size)
        return objects, _ask_count(rng, objects, by, color if by == "color" else shape)
    elif qtype == "existence":
        if variant % 2 == 0:
            specs = _specs(rng, [(color, shape)], colors, shapes)
        else:  # absent, with a near miss so colour or shape alone cannot answer it
            if rng.random() < 0.5:
                near = (color, rng.choice([s for s in shapes if s != shape]))
            else:
                near = (rng.choice([c for c in colors if c != color]), shape)
            specs = _specs(rng, [near], colors, shapes, exclude=(color, shape))
        objects = place_objects(rng, specs, image_size)
        return objects, _ask_existence(rng, objects, color, shape)
    else:
        raise ValueError(f"unknown question type {qtype!r}")
    objects = place_objects(rng, specs, image_size)
    target = next(o for o in objects if (o.color, o.shape) == (color, shape))
    ask = {"color": _ask_color, "shape": _ask_shape, "position": _ask_position}[qtype]
    return objects, ask(rng, target)


def _follow_up_candidate(rng: random.Random, objects: list[ShapeObject], others: list[ShapeObject]) -> Question:
    """A random question of a random type, preferring objects other than the first target."""
    qtype = rng.choice(QUESTION_TYPES)
    shape_counts = Counter(o.shape for o in objects)
    color_counts = Counter(o.color for o in objects)
    if qtype == "color":
        pick = [o for o in others if shape_counts[o.shape] == 1]
        if pick:
            return _ask_color(rng, rng.choice(pick))
    elif qtype == "shape":
        pick = [o for o in others if color_counts[o.color] == 1]
        if pick:
            return _ask_shape(rng, rng.choice(pick))
    elif qtype == "count":
        by = rng.choice(("color", "shape"))
        # Mostly about a present attribute (answers 1-3), sometimes any value (answer may be 0).
        value = getattr(rng.choice(objects), by) if rng.random() < 0.75 else rng.choice(
            list(COLORS) if by == "color" else list(SHAPES))
        return _ask_count(rng, objects, by, value)
    elif qtype == "existence":
        if rng.random() < 0.5:
            obj = rng.choice(others)
            return _ask_existence(rng, objects, obj.color, obj.shape)
        present = {(o.color, o.shape) for o in objects}
        near = [(c, s) for c in COLORS for s in SHAPES
                if (c, s) not in present and (c in color_counts or s in shape_counts)]
        return _ask_existence(rng, objects, *rng.choice(near))
    return _ask_position(rng, rng.choice(others))


def follow_up(rng: random.Random, objects: list[ShapeObject], first: Question) -> Question:
    """Second-turn question; never the same text as the first."""
    others = [o for o in objects if o is not first.target] or objects
    for _ in range(8):
        q = _follow_up_candidate(rng, objects, others)
        if q.text != first.text:
            return q
    # A position question about another object (or any, when the first had no target) always differs.
    return _ask_position(rng, others[0])
