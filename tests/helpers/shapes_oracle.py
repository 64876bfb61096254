"""The shapes-corpus tests' readers and their independent oracle: every answer re-derived from the
record's object list, never from the generator's code."""

import json
import re
from pathlib import Path

SHAPE_WORDS = ("circle", "square", "triangle")


def corpus_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def load_splits(root: Path) -> dict[str, list[dict]]:
    return {s: json.loads((root / f"{s}.json").read_text()) for s in ("train", "test")}


def quadrant_of(box: list[int], size: int) -> str:
    x0, y0, x1, y1 = box
    half = size // 2
    assert x1 <= half - 2 or x0 >= half + 2, f"box {box} not well inside a column"
    assert y1 <= half - 2 or y0 >= half + 2, f"box {box} not well inside a row"
    return ("top" if y1 <= half else "bottom") + " " + ("left" if x1 <= half else "right")


def oracle_answer(question: str, objects: list[dict], size: int) -> tuple[str, list[list[int]], list[int] | None]:
    """(answer, boxes of the objects the answer depends on, single target box or None)."""
    q = question.replace("<image>\n", "")
    if m := re.fullmatch(r"(?:What|Which) colour is the (\w+)\?", q):
        hits = [o for o in objects if o["shape"] == m[1]]
        assert len(hits) == 1, f"{q!r}: shape not unique"
        return hits[0]["color"], [hits[0]["box"]], hits[0]["box"]
    if m := re.fullmatch(r"(?:What|Which) shape is the (\w+) object\?", q):
        hits = [o for o in objects if o["color"] == m[1]]
        assert len(hits) == 1, f"{q!r}: colour not unique"
        return hits[0]["shape"], [hits[0]["box"]], hits[0]["box"]
    if m := re.fullmatch(r"Where is the (\w+) (\w+)(?: in the image)?\?", q):
        hits = [o for o in objects if (o["color"], o["shape"]) == (m[1], m[2])]
        assert len(hits) == 1
        return quadrant_of(hits[0]["box"], size), [hits[0]["box"]], hits[0]["box"]
    if m := re.fullmatch(r"How many (\w+?)(?: objects|s) are (?:there|in the image)\?", q):
        key = "shape" if m[1] in SHAPE_WORDS else "color"
        assert q.count("objects") == (key == "color")
        hits = [o["box"] for o in objects if o[key] == m[1]]
        return str(len(hits)), hits, hits[0] if len(hits) == 1 else None
    if m := re.fullmatch(r"Is there a (\w+) (\w+)(?: in the image)?\?", q):
        hits = [o["box"] for o in objects if (o["color"], o["shape"]) == (m[1], m[2])]
        return ("yes" if hits else "no"), hits, hits[0] if hits else None
    raise AssertionError(f"unparsed question {q!r}")
