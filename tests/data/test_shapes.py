"""The synthetic shapes corpus: determinism, answers vs. drawn pixels, balance, LLaVA format.

Answers are recomputed here from `objects` with an independent parser of the question text, and
the objects themselves are checked against the PNG pixels (colour, shape silhouette, box).
"""

from __future__ import annotations

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
from tests.helpers.shapes_oracle import SHAPE_WORDS, corpus_files, load_splits, oracle_answer, quadrant_of

# Independent copies of the palette: a change to the generator's colours must show up here.
RGB = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 90, 230), "yellow": (235, 215, 40),
       "purple": (150, 60, 200), "orange": (245, 140, 30)}
BG = (24, 24, 24)
N = 200


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, dict, dict[str, list[dict]]]:
    root = tmp_path_factory.mktemp("shapes")
    summary = run_shapes(ShapesConfig(out=str(root), n=N, seed=3))
    return root, summary, load_splits(root)


def _all(corpus) -> list[dict]:
    return corpus[2]["train"] + corpus[2]["test"]


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    run_shapes(ShapesConfig(out=str(a), n=40, seed=7))
    run_shapes(ShapesConfig(out=str(b), n=40, seed=7))
    run_shapes(ShapesConfig(out=str(c), n=40, seed=8))
    fa, fb, fc = corpus_files(a), corpus_files(b), corpus_files(c)
    assert len(fa) == 40 + 2
    assert fa == fb
    assert fa.keys() == fc.keys()
    assert fa["train.json"] != fc["train.json"]
    assert sum(fa[k] != fc[k] for k in fa if k.startswith("images/")) > 30
    # A rerun into an existing corpus with a smaller n leaves no stale images behind.
    run_shapes(ShapesConfig(out=str(b), n=20, seed=7))
    fb2 = corpus_files(b)
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
        assert len({quadrant_of(o["box"], 64) for o in objects}) == len(objects)  # one per quadrant
        for o in objects:
            x0, y0, x1, y1 = o["box"]
            assert 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 64
            assert 14 <= x1 - x0 <= 22 and x1 - x0 == y1 - y0
        for turn, qa in enumerate(rec["qa"]):
            answer, relevant, target = oracle_answer(rec["conversations"][2 * turn]["value"], objects, 64)
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
    splits = load_splits(tmp_path / "big")
    assert splits["test"] == [] and len(splits["train"]) == 10
    for rec in splits["train"]:
        assert Image.open(tmp_path / "big" / rec["image"]).size == (128, 128)
        for o in rec["objects"]:
            assert 28 <= o["box"][2] - o["box"][0] <= 44
        for turn, qa in enumerate(rec["qa"]):
            assert qa["answer"] == oracle_answer(rec["conversations"][2 * turn]["value"], rec["objects"], 128)[0]


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
