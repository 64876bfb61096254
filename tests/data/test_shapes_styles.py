"""The shapes corpus's answer styles (`--answer-style`): short is the original corpus byte for byte;
long styles keep images and questions and state the short answer."""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from alignti.data.shapes import ShapesConfig, run_shapes
from alignti.errors import AlignTIError
from tests.helpers.shapes_oracle import corpus_files, load_splits, oracle_answer, quadrant_of

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
        out[style] = (root, summary, load_splits(root))
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
    hits = [o for o in objects if quadrant_of(o["box"], 64) == (m[1] or m[2])]
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
        assert (pos, color, shape) == (quadrant_of(o["box"], 64), o["color"], o["shape"]) and article == _an(first)
        assert (" " in first) == (qtype == "describe")  # only a description states a size
    return final


def test_long_styles_keep_images_and_questions(styled):
    short_root, _, short = styled["short"]
    short_images = {k: v for k, v in corpus_files(short_root).items() if k.startswith("images/")}
    for style in LONG_STYLES:
        root, _, splits = styled[style]
        files = corpus_files(root)
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
                assert qa["answer"] == oracle_answer(rec["conversations"][2 * turn]["value"], rec["objects"], 64)[0]
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
    fa, fb = corpus_files(tmp_path / "a"), corpus_files(tmp_path / "b")
    assert len(fa) == 200 + 2 and fa == fb
    assert b"The answer is" in fa["train.json"] and b"-describe" in fa["test.json"]


def test_bad_answer_style_raises(tmp_path):
    with pytest.raises(AlignTIError, match="answer-style"):
        run_shapes(ShapesConfig(out=str(tmp_path / "x"), n=5, answer_style="essay"))
    assert not (tmp_path / "x").exists()
