"""The extract tests' world: a tiny shapes teacher and a corpus with every kind of bad row."""

import json
from pathlib import Path

from alignti.extract.config import ExtractConfig
from alignti.models.family import save_model_dir
from tests.helpers.models import shapes_teacher


def extract_world(root: Path) -> tuple[Path, Path, Path]:
    """A tiny shapes teacher and a corpus of its rows plus one of each kind of bad row (rejects):
    (root holding corpus.jsonl, the teacher directory, the shapes folder = image root)."""
    model, processor, shapes = shapes_teacher(root, n=40, seed=1)
    teacher = save_model_dir(model, processor, root / "teacher")
    rows = json.loads((shapes / "train.json").read_text())
    (shapes / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\ntruncated")
    q = lambda img, convs: {"id": f"bad-{len(bad)}", "image": img,  # noqa: E731
                            "conversations": [{"from": f, "value": v} for f, v in convs]}
    bad = []
    bad.append(q("images/none.png", [("human", "<image>\nq"), ("gpt", "a")]))
    bad.append(q("images/nul\x00byte.png", [("human", "<image>\nq"), ("gpt", "a")]))  # no file can have this name
    bad.append(q("bad.png", [("human", "<image>\nq"), ("gpt", "a")]))
    bad.append(q("../../etc/passwd", [("human", "<image>\nq"), ("gpt", "a")]))
    bad.append(q(rows[0]["image"], [("human", "<image>\nq")]))
    bad.append(q(rows[0]["image"], [("human", "q"), ("gpt", "a")]))
    bad.append(q(rows[0]["image"], [("human", "<image>\n" + "red " * 200), ("gpt", "a")]))
    lines = [json.dumps(r) for r in rows + bad]
    lines.insert(3, "{not json")
    (root / "corpus.jsonl").write_text("\n".join(lines) + "\n")
    return root, teacher, shapes


def extract_cfg(world: tuple[Path, Path, Path], out: Path, **kw) -> ExtractConfig:
    """A small-signal extract of `extract_world`'s corpus into `out`; `kw` override options."""
    root, teacher, shapes = world
    base = dict(teacher=str(teacher), data=str(root / "corpus.jsonl"), image_root=str(shapes), out=str(out),
                top_k=8, tpa_d=2, tpa_top_k=4, iva_max_positions=4, iva_top_k=4, irs_samples=8, batch_size=4,
                max_length=160, part_size=6)
    base.update(kw)
    return ExtractConfig(**base)
