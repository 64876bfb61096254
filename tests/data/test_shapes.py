"""The synthetic shapes corpus: determinism, answers vs. drawn pixels, balance, LLaVA format.

Answers are recomputed here from `objects` with an independent parser of the question text, and
the objects themselves are checked against the PNG pixels (colour, shape silhouette, box).
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from alignti.data.corpus import Reject, read_corpus
from alignti.data.shapes import ShapesConfig, run_shapes
from alignti.errors import AlignTIError

# Independent copies of the palette: a change to the generator's colours must show up here.
RGB = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 90, 230), "yellow": (235, 215, 40),
       "purple": (150, 60, 200), "orange": (245, 140, 30)}
BG = (24, 24, 24)
SHAPE_WORDS = ("circle", "square", "triangle")
N = 200


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _load(root: Path) -> dict[str, list[dict]]:
    return {s: json.loads((root / f"{s}.json").read_text()) for s in ("train", "test")}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, dict, dict[str, list[dict]]]:
    root = tmp_path_factory.mktemp("shapes")
    summary = run_shapes(ShapesConfig(out=str(root), n=N, seed=3))
    return root, summary, _load(root)


def _all(corpus) -> list[dict]:
    return corpus[2]["train"] + corpus[2]["test"]


def _quadrant(box: list[int], size: int) -> str:
    x0, y0, x1, y1 = box
    half = size // 2
    assert x1 <= half - 2 or x0 >= half + 2, f"box {box} not well inside a column"
    assert y1 <= half - 2 or y0 >= half + 2, f"box {box} not well inside a row"
    return ("top" if y1 <= half else "bottom") + " " + ("left" if x1 <= half else "right")


def _oracle(question: str, objects: list[dict], size: int) -> tuple[str, list[list[int]], list[int] | None]:
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
        return _quadrant(hits[0]["box"], size), [hits[0]["box"]], hits[0]["box"]
    if m := re.fullmatch(r"How many (\w+?)(?: objects|s) are (?:there|in the image)\?", q):
        key = "shape" if m[1] in SHAPE_WORDS else "color"
        assert q.count("objects") == (key == "color")
        hits = [o["box"] for o in objects if o[key] == m[1]]
        return str(len(hits)), hits, hits[0] if len(hits) == 1 else None
    if m := re.fullmatch(r"Is there a (\w+) (\w+)(?: in the image)?\?", q):
        hits = [o["box"] for o in objects if (o["color"], o["shape"]) == (m[1], m[2])]
        return ("yes" if hits else "no"), hits, hits[0] if hits else None
    raise AssertionError(f"unparsed question {q!r}")


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    run_shapes(ShapesConfig(out=str(a), n=40, seed=7))
    run_shapes(ShapesConfig(out=str(b), n=40, seed=7))
    run_shapes(ShapesConfig(out=str(c), n=40, seed=8))
    fa, fb, fc = _files(a), _files(b), _files(c)
    assert len(fa) == 40 + 2
    assert fa == fb
    assert fa.keys() == fc.keys()
    assert fa["train.json"] != fc["train.json"]
    assert sum(fa[k] != fc[k] for k in fa if k.startswith("images/")) > 30
    # A rerun into an existing corpus with a smaller n leaves no stale images behind.
    run_shapes(ShapesConfig(out=str(b), n=20, seed=7))
    fb2 = _files(b)
    assert sorted(k for k in fb2 if k.startswith("images/")) == [f"images/{i:06d}.png" for i in range(20)]
    assert all(fb2[k] == fa[k] for k in fb2 if k.startswith("images/"))  # records depend only on (seed, i)


def test_png_has_no_metadata_chunks(corpus):
    data = (corpus[0] / "images" / "000000.png").read_bytes()
    pos, chunks = 8, []
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        chunks.append(kind.decode())
        pos += 12 + length
    assert set(chunks) == {"IHDR", "IDAT", "IEND"}


def test_llava_format_and_reader_accepts_every_row(corpus):
    root, _, splits = corpus
    for split in ("train", "test"):
        rows = list(read_corpus(root / f"{split}.json"))
        assert not [r for r in rows if isinstance(r, Reject)]
    ids = [r["id"] for r in _all(corpus)]
    assert len(set(ids)) == N
    for rec in _all(corpus):
        conv = rec["conversations"]
        assert len(conv) in (2, 4)
        assert [t["from"] for t in conv] == ["human", "gpt"] * (len(conv) // 2)
        assert conv[0]["value"].startswith("<image>\n") and conv[0]["value"].count("<image>") == 1
        assert all("<image>" not in t["value"] for t in conv[1:])
        assert rec["answer"] == conv[1]["value"]
        assert len(rec["qa"]) == len(conv) // 2
        for t in conv[1::2]:
            assert t["value"] == t["value"].lower().strip() and not t["value"].endswith(".")
            assert len(t["value"].split()) <= 2
        img_path = (root / rec["image"]).resolve()
        assert root.resolve() in img_path.parents and img_path.is_file()


def test_answers_and_boxes_match_objects(corpus):
    for rec in _all(corpus):
        objects = rec["objects"]
        assert 2 <= len(objects) <= 4
        assert len({(o["color"], o["shape"]) for o in objects}) == len(objects)
        assert len({_quadrant(o["box"], 64) for o in objects}) == len(objects)  # one per quadrant
        for o in objects:
            x0, y0, x1, y1 = o["box"]
            assert 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 64
            assert 14 <= x1 - x0 <= 22 and x1 - x0 == y1 - y0
        for turn, qa in enumerate(rec["qa"]):
            answer, relevant, target = _oracle(rec["conversations"][2 * turn]["value"], objects, 64)
            assert qa["answer"] == answer == rec["conversations"][2 * turn + 1]["value"]
            assert sorted(qa["relevant_boxes"]) == sorted(relevant)
            assert qa["target_box"] == target
        assert rec["question_type"] == rec["qa"][0]["question_type"]
        assert rec["target_box"] == rec["qa"][0]["target_box"]
    # Single-target question types always carry a box.
    assert all(r["target_box"] for r in _all(corpus) if r["question_type"] in ("color", "shape", "position"))


def _check_silhouette(mask: np.ndarray, shape: str) -> None:
    """mask: bool [h, w] of object-coloured pixels inside the box."""
    h, w = mask.shape
    assert mask[0].any() and mask[-1].any() and mask[:, 0].any() and mask[:, -1].any()  # tight box
    fill = mask.mean()
    if shape == "square":
        assert mask.all()
    elif shape == "circle":
        assert 0.68 < fill < 0.88 and not mask[0, 0] and not mask[-1, -1] and mask[h // 2].all()
    else:  # apex-up triangle: bottom row full, top corners empty, about half the box
        assert 0.4 < fill < 0.65 and mask[-1].all() and not mask[0, 0] and not mask[0, -1]
        assert mask[0, (w - 1) // 2]


def test_pixels_match_objects(corpus):
    root = corpus[0]
    for rec in _all(corpus)[:80]:
        img = Image.open(root / rec["image"])
        assert img.mode == "RGB" and img.size == (64, 64)
        px = np.asarray(img)
        covered = np.zeros((64, 64), bool)
        for o in rec["objects"]:
            x0, y0, x1, y1 = o["box"]
            crop = px[y0:y1, x0:x1]
            mine = (crop == RGB[o["color"]]).all(-1)
            background = (crop == BG).all(-1)
            assert (mine | background).all(), "another colour inside an object's box"
            _check_silhouette(mine, o["shape"])
            covered[y0:y1, x0:x1] = True
        assert (px[~covered] == BG).all(), "something drawn outside every box"


def test_question_types_and_answers_balanced(corpus):
    _, summary, splits = corpus
    recs = _all(corpus)
    assert Counter(r["question_type"] for r in recs) == {t: N // 5 for t in
                                                        ("color", "shape", "position", "count", "existence")}
    assert summary["splits"] == {"train": len(splits["train"]), "test": len(splits["test"])}
    assert len(splits["test"]) == 20
    assert summary["question_types"]["test"] == {t: 4 for t in ("color", "shape", "position", "count", "existence")}
    by_type = {t: Counter(r["answer"] for r in recs if r["question_type"] == t) for t in summary["question_types"]["train"]}
    assert by_type["existence"] == {"yes": 20, "no": 20}
    assert by_type["count"] == {"0": 10, "1": 10, "2": 10, "3": 10}
    assert set(by_type["position"]) == {"top left", "top right", "bottom left", "bottom right"}
    assert min(by_type["position"].values()) >= 4
    assert set(by_type["color"]) == set(RGB) and set(by_type["shape"]) == set(SHAPE_WORDS)
    multi = sum(len(r["conversations"]) == 4 for r in recs)
    assert 0.1 * N <= multi <= 0.3 * N
    assert multi == sum(summary["multi_turn"].values())


def test_vocabulary_is_small_and_closed(corpus):
    words = {w for r in _all(corpus) for t in r["conversations"]
             for w in re.findall(r"[a-z0-9]+", t["value"].replace("<image>", "").lower())}
    assert 35 <= len(words) <= 50, sorted(words)


def test_image_size_scales_objects(tmp_path):
    run_shapes(ShapesConfig(out=str(tmp_path / "big"), n=10, seed=0, image_size=128, test_fraction=0.0))
    splits = _load(tmp_path / "big")
    assert splits["test"] == [] and len(splits["train"]) == 10
    for rec in splits["train"]:
        assert Image.open(tmp_path / "big" / rec["image"]).size == (128, 128)
        for o in rec["objects"]:
            assert 28 <= o["box"][2] - o["box"][0] <= 44
        for turn, qa in enumerate(rec["qa"]):
            assert qa["answer"] == _oracle(rec["conversations"][2 * turn]["value"], rec["objects"], 128)[0]


@pytest.mark.parametrize("kwargs", [{"n": 0}, {"test_fraction": 1.0}, {"test_fraction": -0.1},
                                    {"image_size": 16}])
def test_bad_config_raises(tmp_path, kwargs):
    with pytest.raises(AlignTIError):
        run_shapes(ShapesConfig(out=str(tmp_path / "x"), **kwargs))


def test_refuses_non_empty_foreign_directory(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(AlignTIError):
        run_shapes(ShapesConfig(out=str(tmp_path), n=5))
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


# --- answer styles ------------------------------------------------------------------------

# sha256 of the corpus `ShapesConfig(n=25, seed=3, image_size=32, test_fraction=0.2)` wrote
# before answer styles existed: train.json, test.json, and every image's name + decoded RGB
# pixels (pixels, not PNG bytes, so a new zlib in Pillow does not break the pin).
PINNED_SHORT = {"train.json": "176ccbb13d742b02c5e8056062df6d615eb8d1e3471ae61c0fc95c2837af8563",
                "test.json": "897f2b92023d6c44a32f432a414dbf538883e39a71c652e01eaf1f4a8073dd2d",
                "pixels": "5f309aa7bf0b3f786d065bec5ed014de19d6bd88886c90943faf6cd6099f32d4"}
LONG_STYLES = ("sentence", "reasoning", "mixed")
COUNT_WORDS = {"no": "0", "one": "1", "two": "2", "three": "3", "four": "4"}


def _digests(root: Path) -> dict[str, str]:
    pixels = hashlib.sha256()
    for p in sorted((root / "images").iterdir()):
        pixels.update(p.name.encode())
        pixels.update(np.asarray(Image.open(p).convert("RGB")).tobytes())
    return {"train.json": hashlib.sha256((root / "train.json").read_bytes()).hexdigest(),
            "test.json": hashlib.sha256((root / "test.json").read_bytes()).hexdigest(), "pixels": pixels.hexdigest()}


@pytest.mark.parametrize("style", [None, "short"])
def test_short_style_is_the_original_corpus(tmp_path, style):
    kwargs = {} if style is None else {"answer_style": style}
    run_shapes(ShapesConfig(out=str(tmp_path), n=25, seed=3, image_size=32, test_fraction=0.2, **kwargs))
    assert _digests(tmp_path) == PINNED_SHORT
    assert "describe" not in (tmp_path / "train.json").read_text() + (tmp_path / "test.json").read_text()


@pytest.fixture(scope="module")
def styled(tmp_path_factory) -> dict[str, tuple[Path, dict, dict[str, list[dict]]]]:
    """{style: (root, summary, records by split)}: one seed in every style."""
    out = {}
    for style in ("short", *LONG_STYLES):
        root = tmp_path_factory.mktemp(style)
        summary = run_shapes(ShapesConfig(out=str(root), n=60, seed=5, answer_style=style))
        out[style] = (root, summary, _load(root))
    return out


def _without_answers(rec: dict) -> dict:
    """A record minus what its answer style changes."""
    drop = {"answer", "answer_style"}
    return {**{k: v for k, v in rec.items() if k not in drop | {"qa", "conversations"}},
            "conversations": [t for t in rec["conversations"] if t["from"] == "human"],
            "qa": [{k: v for k, v in qa.items() if k not in drop} for qa in rec["qa"]]}


def _describe_oracle(question: str, objects: list[dict]) -> tuple[str, dict] | None:
    """(short answer, object) of a description question at 64 px, None for other questions."""
    m = re.fullmatch(r"(?:<image>\n)?(?:Describe the object in the (\w+ \w+)\.|What is the object in the (\w+ \w+)\?)",
                     question)
    if not m:
        return None
    hits = [o for o in objects if _quadrant(o["box"], 64) == (m[1] or m[2])]
    assert len(hits) == 1
    side = hits[0]["box"][2] - hits[0]["box"][0]
    return f"a {'small' if side <= 18 else 'large'} {hits[0]['color']} {hits[0]['shape']}", hits[0]


def _an(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _sentence_key(question: str, answer: str, qtype: str) -> str:
    """The short answer a sentence-style answer states, checked against the question's words."""
    q = question.replace("<image>\n", "")
    if qtype == "color":
        m = re.fullmatch(r"The (\w+) is (\w+)\.", answer)
        assert m and m[1] in q
        return m[2]
    if qtype == "shape":
        m = re.fullmatch(r"The (\w+) object is (an?) (\w+)\.", answer)
        assert m and m[1] in q and m[2] == _an(m[3])
        return m[3]
    if qtype == "position":
        m = re.fullmatch(r"The (\w+ \w+) is in the (\w+ \w+)\.", answer)
        assert m and m[1] in q
        return m[2]
    if qtype == "count":
        m = re.fullmatch(r"There is (one) (\w+(?: object)?)\."
                         r"|There are (no|two|three|four) (\w+(?: object)?)s\.", answer)
        assert m and (m[2] or m[4]).split()[0] in q
        return COUNT_WORDS[m[1] or m[3]]
    if qtype == "existence":
        m = re.fullmatch(r"Yes, there is (an?) (\w+ \w+)\.|No, there is no (\w+ \w+)\.", answer)
        assert m and (m[2] or m[3]) in q and (m[1] is None or m[1] == _an(m[2]))
        return "yes" if m[2] else "no"
    m = re.fullmatch(r"The object in the (\w+ \w+) is (a (?:small|large) \w+ \w+)\.", answer)
    assert m and m[1] in q
    return m[2]


def _reasoning_key(answer: str, qtype: str, objects: list[dict], relevant: list[list[int]]) -> str:
    """The short answer after "The answer is"; the facts before it name exactly the relevant objects."""
    facts, final = re.fullmatch(r"(.+\.) The answer is (.+)\.", answer).groups()
    described = re.findall(r"The (\w+ \w+) quadrant holds (an?) ((?:small |large )?\w+) (\w+)\.", facts)
    by_box = {tuple(o["box"]): o for o in objects}
    expect = [by_box[tuple(b)] for b in relevant]
    if not expect:
        assert re.fullmatch(r"No quadrant holds an? [\w ]+\.", facts), facts
        return final
    assert len(described) == len(expect)
    assert " ".join(f"The {p} quadrant holds {a} {f} {s}." for p, a, f, s in described) == facts  # nothing else
    in_quadrant_order = sorted(expect, key=lambda o: (o["box"][1] >= 32, o["box"][0] >= 32))
    for (pos, article, first, shape), o in zip(described, in_quadrant_order):
        color = first.split()[-1]
        assert (pos, color, shape) == (_quadrant(o["box"], 64), o["color"], o["shape"]) and article == _an(first)
        assert (" " in first) == (qtype == "describe")  # only a description states a size
    return final


def test_long_styles_keep_images_and_questions(styled):
    short_root, _, short = styled["short"]
    short_images = {k: v for k, v in _files(short_root).items() if k.startswith("images/")}
    for style in LONG_STYLES:
        root, _, splits = styled[style]
        files = _files(root)
        assert files.keys() - {"train.json", "test.json"} == short_images.keys()
        assert {k: files[k] for k in short_images} == short_images  # the same PNG bytes
        for split in ("train", "test"):
            own = [r for r in splits[split] if not r["id"].endswith("-describe")]
            assert [_without_answers(r) for r in own] == [_without_answers(r) for r in short[split]]


def test_long_answers_state_the_short_answer(styled):
    short = {r["id"]: r for recs in styled["short"][2].values() for r in recs}
    for style in ("sentence", "reasoning"):
        for rec in [r for recs in styled[style][2].values() for r in recs]:
            for turn, qa in enumerate(rec["qa"]):
                question, answer = rec["conversations"][2 * turn]["value"], rec["conversations"][2 * turn + 1]["value"]
                assert qa["answer"] == answer and qa["answer_style"] == style
                described = _describe_oracle(question, rec["objects"])
                gold = described[0] if described else short[rec["id"]]["qa"][turn]["answer"]
                key = (_sentence_key(question, answer, qa["question_type"]) if style == "sentence" else
                       _reasoning_key(answer, qa["question_type"], rec["objects"], qa["relevant_boxes"]))
                assert key == gold, (question, answer)


def test_mixed_draws_a_style_per_question(styled):
    by_style = {s: {r["id"]: r for recs in styled[s][2].values() for r in recs} for s in ("sentence", "reasoning")}
    drawn = Counter()
    for rec in [r for recs in styled["mixed"][2].values() for r in recs]:
        for turn, qa in enumerate(rec["qa"]):
            drawn[qa["answer_style"]] += 1
            if qa["answer_style"] != "short":
                assert qa["answer"] == by_style[qa["answer_style"]][rec["id"]]["qa"][turn]["answer"]
            elif not rec["id"].endswith("-describe"):
                assert qa["answer"] == _oracle(rec["conversations"][2 * turn]["value"], rec["objects"], 64)[0]
        assert rec["answer_style"] == rec["qa"][0]["answer_style"]
    assert set(drawn) == {"short", "sentence", "reasoning"} and min(drawn.values()) > 10


def test_description_records(styled):
    for style in LONG_STYLES:
        _, summary, splits = styled[style]
        for split, recs in splits.items():
            for prev, rec in zip(recs, recs[1:]):
                assert rec["id"].endswith("-describe") == (prev["question_type"] == "position")
                if rec["id"].endswith("-describe"):  # right after its image's own record
                    assert rec["id"] == prev["id"] + "-describe" and rec["image"] == prev["image"]
                    assert rec["objects"] == prev["objects"] and rec["question_type"] == "describe"
                    _, obj = _describe_oracle(rec["conversations"][0]["value"], rec["objects"])
                    assert len(rec["conversations"]) == 2 and len(rec["qa"]) == 1
                    assert rec["target_box"] == rec["qa"][0]["target_box"] == obj["box"]
                    assert rec["relevant_boxes"] == rec["qa"][0]["relevant_boxes"] == [obj["box"]]
            counts = summary["question_types"][split]
            assert counts["describe"] == counts["position"] == sum(r["question_type"] == "describe" for r in recs)
    assert "describe" not in styled["short"][1]["question_types"]["train"]
    sizes = Counter(_describe_oracle(r["conversations"][0]["value"], r["objects"])[0].split()[1]
                    for r in styled["sentence"][2]["train"] if r["question_type"] == "describe")
    assert set(sizes) == {"small", "large"}, sizes


def test_long_vocabulary_is_small_and_closed(styled):
    for style in LONG_STYLES:
        words = {w for recs in styled[style][2].values() for r in recs for t in r["conversations"]
                 for w in re.findall(r"[a-z0-9]+", t["value"].replace("<image>", "").lower())}
        assert len(words) <= 75, (style, len(words), sorted(words))


def test_reasoning_cli_twice_same_bytes(tmp_path):
    from click.testing import CliRunner

    from alignti.cli import cli

    for name in ("a", "b"):
        res = CliRunner().invoke(cli, ["data", "shapes", "--out", str(tmp_path / name), "--answer-style", "reasoning",
                                       "--n", "200", "--seed", "3"])
        assert res.exit_code == 0, res.output
    fa, fb = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert len(fa) == 200 + 2 and fa == fb
    assert b"The answer is" in fa["train.json"] and b"-describe" in fa["test.json"]


def test_bad_answer_style_raises(tmp_path):
    with pytest.raises(AlignTIError, match="answer-style"):
        run_shapes(ShapesConfig(out=str(tmp_path / "x"), n=5, answer_style="essay"))
    assert not (tmp_path / "x").exists()
