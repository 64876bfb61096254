"""`alignti data shapes`: a seeded synthetic VQA corpus of coloured shapes in LLaVA format.

Every first question has one of five types, balanced exactly (each block of five consecutive
images holds one of each): `color` ("What colour is the square?", the shape is unique in the
image), `shape` ("What shape is the red object?", the colour is unique), `position` ("Where is
the red circle?" -> one of "top left|top right|bottom left|bottom right"), `count` ("How many
red objects are there?" / "How many circles are there?" -> "0".."3", answers balanced) and
`existence` ("Is there a red circle?" -> "yes"/"no", balanced; a "no" always has a near miss:
same colour other shape, or same shape other colour). About 20% of records have a second
question (no `<image>` tag) about another object. With `--answer-style short` (the default)
answers are short, lowercase, no period.

The other styles (`shapes_answers.py`) answer the same questions in a sentence, or with a
short reasoning that ends in "The answer is <short answer>.", or (`mixed`) in a style drawn per
question. They also add a sixth question type, `describe` ("Describe the object in the top
left." -> "a small yellow triangle"), as a record of its own (id `shapes-<i>-describe`) on the
image of each block's position question, in that image's split. Scenes, images, question
texts and boxes do not depend on the style: a short corpus is the long one minus the
description records, with other answer texts. Long-style records carry `answer_style` (top
level and in every `qa` entry: short|sentence|reasoning, what `mixed` drew).

`target_box` is the box of the one object the first answer depends on. Count and existence
questions have one only when exactly one object matches (count "1", existence "yes"); otherwise
`target_box` is null and `relevant_boxes` lists every matching object (empty for "0"/"no").
`qa` repeats question_type / answer / target_box / relevant_boxes for every turn. A
description's box is its object's.

Image i's records depend only on (seed, i, image_size, answer_style), so a smaller `n` gives
a prefix of a larger one; the same config always writes the same bytes (sorted JSON keys, fixed
separators, PNGs with no metadata).
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

from alignti.data.shapes_answers import ANSWER_STYLES, MIXED_STYLES, styled_answer
from alignti.data.shapes_questions import (DESCRIBE, QUESTION_TYPES, Question, describe_question, first_question,
                                           follow_up)
from alignti.data.shapes_render import ShapeObject, geometry, png_bytes, render
from alignti.errors import AlignTIError
from alignti.progress import progress_bar

MULTI_TURN_FRACTION = 0.2
# Long styles add one description record per block of five images, on the image of the block's
# position question (so the test split holds exactly as many descriptions as position questions).
DESCRIBED_TYPE = "position"


@dataclass(frozen=True)
class ShapesConfig:
    """Options of `alignti data shapes`."""

    out: str = field(metadata={"help": "output directory (train.json, test.json, images/); also the image root"})
    n: int = field(default=2000, metadata={
        "help": "number of images (train + test), one record each, plus description records in the long styles"})
    seed: int = field(default=0, metadata={"help": "random seed; the same seed writes the same bytes"})
    image_size: int = field(default=64, metadata={"help": "image side in pixels (>= 32)"})
    test_fraction: float = field(default=0.1, metadata={"help": "share of records in test.json, stratified by question type"})
    answer_style: str = field(default="short", metadata={"choices": ANSWER_STYLES, "help": (
        "short: a word or phrase ('yellow', '2', 'top left'), the original corpus; sentence: one sentence "
        "('The triangle is yellow.'); reasoning: where each relevant object is, then the answer ('The top "
        "right quadrant holds a yellow triangle. The answer is yellow.'); mixed: one of the three per "
        "question, seeded. Every style but short adds a description record ('Describe the object in the "
        "top left.' -> 'a small yellow triangle') on one image in five. Images and questions are the same "
        "in every style")})


def _record(rid: str, image: str, objects: list[ShapeObject], questions: list[Question],
            styles: list[str] | None) -> dict:
    """One LLaVA-format record; `styles` (None: short, no `answer_style` field) per question."""
    answers = [styled_answer(q, st) for q, st in zip(questions, styles)] if styles else [q.answer for q in questions]
    qa = [q.meta(a) for q, a in zip(questions, answers)]
    for meta, style in zip(qa, styles or ()):
        meta["answer_style"] = style
    conversations = []
    for turn, (q, a) in enumerate(zip(questions, answers)):
        conversations.append({"from": "human", "value": ("<image>\n" if turn == 0 else "") + q.text})
        conversations.append({"from": "gpt", "value": a})
    return {"id": rid, "image": image, "conversations": conversations, **qa[0],
            "objects": [o.to_json() for o in objects], "qa": qa}


def make_record(seed: int, index: int, qtype: str, variant: int, image_size: int, digits: int = 6,
                answer_style: str = "short") -> tuple[list[dict], bytes]:
    """Image `index`'s records (its own, then a description record if it gets one) and PNG bytes.

    Depends only on the arguments. The scene and the questions come from one generator seeded by
    (seed, index), the description and the styles `mixed` draws from generators of their own, so
    every style sees the same images and questions.
    """
    rng = random.Random(f"alignti-shapes:{seed}:{index}")
    objects, first = first_question(rng, qtype, variant, image_size)
    questions = [first]
    if rng.random() < MULTI_TURN_FRACTION:
        questions.append(follow_up(rng, objects, first))
    png = png_bytes(render(objects, image_size))
    name = f"{index:0{digits}d}"
    image = f"images/{name}.png"
    if answer_style == "short":
        return [_record(f"shapes-{name}", image, objects, questions, None)], png
    style_rng = random.Random(f"alignti-shapes-style:{seed}:{index}")
    n_questions = len(questions) + (qtype == DESCRIBED_TYPE)
    styles = [style_rng.choice(MIXED_STYLES) if answer_style == "mixed" else answer_style for _ in range(n_questions)]
    records = [_record(f"shapes-{name}", image, objects, questions, styles[:len(questions)])]
    if qtype == DESCRIBED_TYPE:
        describe = describe_question(random.Random(f"alignti-shapes-describe:{seed}:{index}"), objects, image_size)
        records.append(_record(f"shapes-{name}-describe", image, objects, [describe], styles[-1:]))
    return records, png


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
    if cfg.answer_style not in ANSWER_STYLES:
        raise AlignTIError(f"--answer-style must be one of {', '.join(ANSWER_STYLES)}, got {cfg.answer_style!r}")
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
        records, png = make_record(cfg.seed, i, types[i], i // 5, cfg.image_size, digits, cfg.answer_style)
        (root / records[0]["image"]).write_bytes(png)
        splits["test" if i in held else "train"] += records  # a description stays with its image
    for split, records in splits.items():
        _dump(root / f"{split}.json", records)
    qtypes = QUESTION_TYPES + (() if cfg.answer_style == "short" else (DESCRIBE,))
    return {
        "out": str(root),
        "splits": {s: len(r) for s, r in splits.items()},
        "question_types": {s: {t: sum(r["question_type"] == t for r in recs) for t in qtypes}
                           for s, recs in splits.items()},
        "multi_turn": {s: sum(len(r["conversations"]) > 2 for r in recs) for s, recs in splits.items()},
    }
