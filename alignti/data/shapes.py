"""`alignti data shapes`: a seeded synthetic VQA corpus of coloured shapes in LLaVA format.

Every first question has one of five types, balanced exactly (each block of five consecutive
records holds one of each): `color` ("What colour is the square?", the shape is unique in the
image), `shape` ("What shape is the red object?", the colour is unique), `position` ("Where is
the red circle?" -> one of "top left|top right|bottom left|bottom right"), `count` ("How many
red objects are there?" / "How many circles are there?" -> "0".."3", answers balanced) and
`existence` ("Is there a red circle?" -> "yes"/"no", balanced; a "no" always has a near miss:
same colour other shape, or same shape other colour). About 20% of records have a second
question (no `<image>` tag) about another object. Answers are short, lowercase, no period.

`target_box` is the box of the one object the first answer depends on. Count and existence
questions have one only when exactly one object matches (count "1", existence "yes"); otherwise
`target_box` is null and `relevant_boxes` lists every matching object (empty for "0"/"no").
`qa` repeats question_type / answer / target_box / relevant_boxes for every turn.

Record i depends only on (seed, i, image_size), so a smaller `n` gives a prefix of a larger one;
the same config always writes the same bytes (sorted JSON keys, fixed separators, PNGs with no
metadata).
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from alignti.data.shapes_render import COLORS, SHAPES, ShapeObject, geometry, place_objects, png_bytes, render
from alignti.errors import AlignTIError
from alignti.progress import progress_bar

QUESTION_TYPES = ("color", "shape", "position", "count", "existence")
MULTI_TURN_FRACTION = 0.2
# Two phrasings per question keep some variety while the vocabulary stays tiny (the demo's
# tokenizer is trained on this corpus).
TEMPLATES: dict[str, tuple[str, ...]] = {
    "color": ("What colour is the {shape}?", "Which colour is the {shape}?"),
    "shape": ("What shape is the {color} object?", "Which shape is the {color} object?"),
    "position": ("Where is the {color} {shape}?", "Where is the {color} {shape} in the image?"),
    "count_color": ("How many {color} objects are there?", "How many {color} objects are in the image?"),
    "count_shape": ("How many {shape}s are there?", "How many {shape}s are in the image?"),
    "existence": ("Is there a {color} {shape}?", "Is there a {color} {shape} in the image?"),
}


@dataclass(frozen=True)
class ShapesConfig:
    """Options of `alignti data shapes`."""

    out: str = field(metadata={"help": "output directory (train.json, test.json, images/); also the image root"})
    n: int = field(default=2000, metadata={"help": "number of records (one image each), train + test"})
    seed: int = field(default=0, metadata={"help": "random seed; the same seed writes the same bytes"})
    image_size: int = field(default=64, metadata={"help": "image side in pixels (>= 32)"})
    test_fraction: float = field(default=0.1, metadata={"help": "share of records in test.json, stratified by question type"})


@dataclass(frozen=True)
class Question:
    """One question about a scene; `target` is the single object the answer depends on, if any."""

    qtype: str
    text: str
    answer: str
    target: ShapeObject | None
    relevant: tuple[ShapeObject, ...]

    def meta(self) -> dict:
        return {"question_type": self.qtype, "answer": self.answer,
                "target_box": list(self.target.box) if self.target else None,
                "relevant_boxes": [list(o.box) for o in self.relevant]}


def _ask_color(rng: random.Random, target: ShapeObject) -> Question:
    return Question("color", rng.choice(TEMPLATES["color"]).format(shape=target.shape), target.color,
                    target, (target,))


def _ask_shape(rng: random.Random, target: ShapeObject) -> Question:
    return Question("shape", rng.choice(TEMPLATES["shape"]).format(color=target.color), target.shape,
                    target, (target,))


def _ask_position(rng: random.Random, target: ShapeObject) -> Question:
    text = rng.choice(TEMPLATES["position"]).format(color=target.color, shape=target.shape)
    return Question("position", text, target.position, target, (target,))


def _ask_count(rng: random.Random, objects: list[ShapeObject], by: str, value: str) -> Question:
    relevant = tuple(o for o in objects if getattr(o, by) == value)
    text = rng.choice(TEMPLATES[f"count_{by}"]).format(**{by: value})
    return Question("count", text, str(len(relevant)), relevant[0] if len(relevant) == 1 else None, relevant)


def _ask_existence(rng: random.Random, objects: list[ShapeObject], color: str, shape: str) -> Question:
    relevant = tuple(o for o in objects if o.color == color and o.shape == shape)
    text = rng.choice(TEMPLATES["existence"]).format(color=color, shape=shape)
    return Question("existence", text, "yes" if relevant else "no", relevant[0] if relevant else None, relevant)


def _specs(rng: random.Random, fixed: list[tuple[str, str]], colors: list[str], shapes: list[str],
           exclude: tuple[str, str] | None = None) -> list[tuple[str, str]]:
    """`fixed` (color, shape) pairs plus random distinct distractors from colors x shapes; 2-4 in all."""
    n_obj = rng.randint(max(2, len(fixed)), 4)
    pool = [(c, s) for c in colors for s in shapes if (c, s) not in fixed and (c, s) != exclude]
    return fixed + rng.sample(pool, n_obj - len(fixed))


def _first_question(rng: random.Random, qtype: str, variant: int,
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


def _follow_up(rng: random.Random, objects: list[ShapeObject], first: Question) -> Question:
    """Second-turn question; never the same text as the first."""
    others = [o for o in objects if o is not first.target] or objects
    for _ in range(8):
        q = _follow_up_candidate(rng, objects, others)
        if q.text != first.text:
            return q
    # A position question about another object (or any, when the first had no target) always differs.
    return _ask_position(rng, others[0])


def make_record(seed: int, index: int, qtype: str, variant: int, image_size: int,
                digits: int = 6) -> tuple[dict, bytes]:
    """One LLaVA-format record and its PNG bytes; depends only on the arguments."""
    rng = random.Random(f"alignti-shapes:{seed}:{index}")
    objects, first = _first_question(rng, qtype, variant, image_size)
    questions = [first]
    if rng.random() < MULTI_TURN_FRACTION:
        questions.append(_follow_up(rng, objects, first))
    conversations = []
    for turn, q in enumerate(questions):
        conversations.append({"from": "human", "value": ("<image>\n" if turn == 0 else "") + q.text})
        conversations.append({"from": "gpt", "value": q.answer})
    name = f"{index:0{digits}d}"
    record = {"id": f"shapes-{name}", "image": f"images/{name}.png", "conversations": conversations,
              **first.meta(), "objects": [o.to_json() for o in objects], "qa": [q.meta() for q in questions]}
    return record, png_bytes(render(objects, image_size))


def _block_types(seed: int, block: int) -> list[str]:
    """The five question types in a seeded order for block `block` (records 5*block .. 5*block+4)."""
    types = list(QUESTION_TYPES)
    random.Random(f"alignti-shapes-types:{seed}:{block}").shuffle(types)
    return types


def _test_indices(seed: int, types: list[str], fraction: float) -> set[int]:
    """Held-out record indices: round(fraction * count) of each question type, chosen by seed."""
    rng = random.Random(f"alignti-shapes-split:{seed}")
    held: set[int] = set()
    for qtype in QUESTION_TYPES:
        idx = [i for i, t in enumerate(types) if t == qtype]
        held.update(rng.sample(idx, round(fraction * len(idx))))
    return held


_IMAGE_NAME = re.compile(r"^\d+\.png$")


def _prepare_out(out: str) -> Path:
    """Create `out`, or reuse a previous shapes corpus there (its numbered PNGs are removed)."""
    root = Path(out)
    if root.exists() and not root.is_dir():
        raise AlignTIError(f"--out {out!r} exists and is not a directory")
    if root.is_dir() and any(root.iterdir()) and not (root / "train.json").is_file():
        raise AlignTIError(f"--out {out!r} is not empty and holds no shapes corpus; use an empty directory")
    images = root / "images"
    if images.is_dir():  # stale images from a larger earlier run would linger otherwise
        for p in images.iterdir():
            if _IMAGE_NAME.match(p.name) and p.is_file():
                p.unlink()
    images.mkdir(parents=True, exist_ok=True)
    return root


def _validate(cfg: ShapesConfig) -> None:
    if cfg.n < 1:
        raise AlignTIError(f"--n must be >= 1, got {cfg.n}")
    if not 0.0 <= cfg.test_fraction < 1.0:
        raise AlignTIError(f"--test-fraction must be in [0, 1), got {cfg.test_fraction}")
    if cfg.image_size > 2048:
        raise AlignTIError(f"--image-size must be <= 2048, got {cfg.image_size}")
    geometry(cfg.image_size)  # raises for too-small images


def _dump(path: Path, records: list[dict]) -> None:
    text = json.dumps(records, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    path.write_bytes(text.encode("ascii") + b"\n")


def run_shapes(cfg: ShapesConfig) -> dict:
    """Write the corpus; return {"out", "splits": {split: n}, "question_types": {split: {type: n}},
    "multi_turn": {split: n}}."""
    _validate(cfg)
    root = _prepare_out(cfg.out)
    digits = max(6, len(str(cfg.n - 1)))
    types = [_block_types(cfg.seed, i // 5)[i % 5] for i in range(cfg.n)]
    held = _test_indices(cfg.seed, types, cfg.test_fraction)
    splits: dict[str, list[dict]] = {"train": [], "test": []}
    for i in progress_bar(range(cfg.n), desc="shapes corpus", unit="img", leave=False):
        record, png = make_record(cfg.seed, i, types[i], i // 5, cfg.image_size, digits)
        (root / record["image"]).write_bytes(png)
        splits["test" if i in held else "train"].append(record)
    for split, records in splits.items():
        _dump(root / f"{split}.json", records)
    return {
        "out": str(root),
        "splits": {s: len(r) for s, r in splits.items()},
        "question_types": {s: {t: sum(r["question_type"] == t for r in recs) for t in QUESTION_TYPES}
                           for s, recs in splits.items()},
        "multi_turn": {s: sum(len(r["conversations"]) > 2 for r in recs) for s, recs in splits.items()},
    }
