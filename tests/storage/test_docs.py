"""docs/cache-format.md: its reading snippet runs and agrees with the reader, its sample_id recipe gives
the extractor's ids, its tables match the schema."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from alignti.data.corpus import parse_row
from alignti.data.encode import EncodedSample, SampleEncoder
from alignti.models.family import load_parts
from alignti.storage.reader import CacheReader
from alignti.storage.schema import ARRAYS, SAMPLE_COLUMNS
from alignti.storage.writer import CacheWriter
from tests.storage.helpers import make_samples, manifest

DOC = Path(__file__).resolve().parents[2] / "docs" / "cache-format.md"


def snippet() -> str:
    text = DOC.read_text()
    after = text.split("This snippet is executed by", 1)[1]
    return re.search(r"```python\n(.*?)```", after, re.S).group(1)


def sample_id_recipe() -> Callable[[dict, bytes | None], str]:
    block = next(b for b in re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S) if "def sample_id(" in b)
    ns: dict = {}
    exec(compile(block, str(DOC), "exec"), ns)  # noqa: S102 - our own documentation
    return ns["sample_id"]


def table_rows(heading: str) -> list[list[str]]:
    section = DOC.read_text().split(heading, 1)[1]
    rows = []
    for line in section.splitlines()[1:]:
        if line.startswith("## "):
            break
        if line.startswith("| `"):
            rows.append([c.strip().strip("`") for c in line.strip("|").split("|")])
    return rows


def test_snippet_reads_the_same_sample_as_the_reader(tmp_path):
    root = tmp_path / "c"
    with CacheWriter.open(root, manifest(), worker=0, num_workers=1, part_size=4) as w:
        for s in make_samples(9, seed=21):
            w.add(s)
    ns: dict = {"CACHE": str(root)}
    exec(compile(snippet(), str(DOC), "exec"), ns)  # noqa: S102 - our own documentation
    got = ns["sample"]
    reader = CacheReader.open(str(root))
    ref = reader.get_batch(reader.index_of([got["sample_id"]]))[0]
    assert got["sample_id"] == make_samples(9, seed=21)[0].sample_id  # first sample of the first part
    for name, value in got.items():
        if name == "sample_id":
            continue
        expect = getattr(ref, name)
        assert np.asarray(value).shape == expect.shape, name
        assert np.array_equal(np.asarray(value).astype(expect.dtype), expect), name
    np.testing.assert_allclose(ns["tail_mass"], 1 - np.exp(ref.topk_logprobs.astype(np.float64)).sum(-1))


def test_sample_id_recipe_gives_the_extractors_ids(tiny_model_dir, tmp_path):
    """The doc's sample_id recipe, from the corpus record and image bytes alone, equals what extract stores."""
    Image.new("RGB", (20, 20), "red").save(tmp_path / "a.png")
    turn = lambda f, v: {"from": f, "value": v}  # noqa: E731
    records = [
        {"id": "x", "image": "a.png",
         "conversations": [turn("human", "<image>\n  Où est le cercle ?"), turn("gpt", "À gauche.")]},
        {"id": "y", "conversations": [turn("system", "Be brief."), turn("user", "hi"), turn("assistant", "hello "),
                                      turn("human", "and?"), turn("gpt", "bye")]},
    ]
    recipe = sample_id_recipe()
    encoder = SampleEncoder(load_parts(tiny_model_dir), str(tmp_path), 2048)
    for rec in records:
        enc = encoder.encode(parse_row(rec, "row-0"))
        assert isinstance(enc, EncodedSample), enc
        image = (tmp_path / rec["image"]).read_bytes() if "image" in rec else None
        assert recipe(rec, image) == enc.sample_id, rec["id"]


def test_tables_match_schema():
    first_dim = {"resp": "R", "tpa": "C", "sal": "W", "iva": "Q"}
    arrays = {r[0]: r for r in table_rows("## signals.zarr")}
    assert set(arrays) == {a.name for a in ARRAYS}
    for a in ARRAYS:
        _, dtype, shape, group, encoding, _meaning = arrays[a.name]
        assert (dtype, group, encoding) == (a.stored_dtype, a.group, a.encoding), a.name
        assert shape == "[" + ", ".join([first_dim[a.group], *a.shape[1:]]) + "]", a.name
    columns = {r[0]: r[1] for r in table_rows("## samples.parquet")}
    assert columns == {name: typ for name, typ, _ in SAMPLE_COLUMNS}
