"""`alignti distill` end to end on tiny models: extract a cache, distil with each recipe, reload.

The world is `worlds.RunWorld`: a shapes corpus, a tokenizer trained on it, a sharpened tiny
teacher, two students of different sizes sharing the teacher's tokenizer and image grid, a
24-sample cache and a 4-sample cache (one micro-batch: training on it repeats a fixed batch).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForImageTextToText

from alignti.data.batching import collate
from alignti.cliargs import leaves
from alignti.distill.config import DistillConfig
from alignti.distill.order import epoch_micro_batches, lr_factor, rank_share, split_steps
from alignti.distill.train import run_distill
from alignti.errors import AlignTIError
from alignti.models.family import load_parts, save_model_dir
from alignti.models.llava import TinySpec, build_tiny_llava
from alignti.models.tokenizer import train_tokenizer
from tests.distill.worlds import distill_config, generate_once, read_log, run_world, weights


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return run_world(tmp_path_factory)


# ---------------------------------------------------------------- pure helpers


def test_data_order_is_seeded_grouped_and_independent_of_processes():
    lengths = list(np.random.default_rng(0).integers(10, 100, size=50))
    a = epoch_micro_batches(lengths, 4, seed=3, epoch=0)
    assert a == epoch_micro_batches(lengths, 4, seed=3, epoch=0)
    assert a != epoch_micro_batches(lengths, 4, seed=3, epoch=1)
    assert sorted(i for b in a for i in b) == list(range(50))  # every sample once per epoch
    # micro-batches hold neighbours in length (sorted windows), so padding is small
    spread = np.mean([max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in a if len(b) == 4])
    assert spread < 15
    # a step's micro-batches are split between processes without loss or overlap; a process
    # left without one re-runs the first with live=False
    step = split_steps(a, 4)[0]
    shares = [rank_share(step, r, 2) for r in range(2)]
    assert sorted(map(tuple, (m for s in shares for m, _ in s))) == sorted(map(tuple, step))
    assert rank_share(step[:1], 1, 2) == [(step[0], False)]


def test_lr_schedule():
    f = [lr_factor(s, warmup=2, total=10, min_ratio=0.1) for s in range(10)]
    assert f[0] == pytest.approx(1 / 3) and f[1] == pytest.approx(2 / 3) and f[2] == pytest.approx(1.0)
    assert all(x >= y for x, y in zip(f[2:], f[3:])) and f[-1] > 0.1


# ---------------------------------------------------------------- end to end


@pytest.mark.parametrize("recipe,terms", [("sft", {"sft"}), ("kd", {"sft", "kd"}),
                                          ("alignti", {"sft", "kd", "iva", "tpa"})])
def test_recipe_trains_on_a_fixed_batch_and_reloads(world, tmp_path, recipe, terms):
    out = tmp_path / "out"
    summary = run_distill(distill_config(cache=str(world.small_cache), student=str(world.student), out=str(out),
                                        recipe=recipe, lr=3e-3, warmup_ratio=0.0, batch_size=4, epochs=6,
                                        save_every=0, progress=False))
    log = read_log(out)
    assert summary["steps"] == len(log) == 6 and summary["samples"] == 4
    for rec in log:
        assert {"sft", "kd", "iva", "tpa"} & set(rec) == terms
        assert all(np.isfinite(rec[t]) and rec[t] >= 0 for t in terms) and np.isfinite(rec["loss"])
        assert rec["tokens"] > 0 and rec["tokens_per_second"] > 0
    # the same 4 samples every step: the objective and every distillation term go down
    assert log[-1]["loss"] < log[0]["loss"]
    for t in terms - {"sft"}:
        assert log[-1][t] < log[0][t], (t, [r[t] for r in log])
    assert summary["final_losses"]["loss"] == pytest.approx(log[-1]["loss"])
    # step 1's L_sft is the mean cross-entropy over the batch's labelled tokens: the HF loss
    start = AutoModelForImageTextToText.from_pretrained(world.student).eval()
    proc = load_parts(world.student)
    from alignti.data.encode import SampleEncoder
    from alignti.distill.examples import cache_examples
    from alignti.storage.reader import CacheReader

    examples, _ = cache_examples(CacheReader.open(str(world.small_cache)), SampleEncoder(proc, None, 2048), None)
    batch = collate([e.student for e in examples], proc.tokenizer.pad_token_id)
    with torch.no_grad():
        ref = start(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                    **batch.images, labels=batch.labels).loss
    assert log[0]["sft"] == pytest.approx(float(ref), rel=1e-5), log
    # the saved student reloads with the Auto classes, differs from the start and generates
    final = weights(out / "final")
    assert any(not torch.equal(v, weights(world.student)[k]) for k, v in final.items())
    assert generate_once(out / "final", world).numel() > 0


def test_one_cache_distils_two_student_sizes(world, tmp_path):
    hidden = []
    for student in (world.student, world.student_b):
        out = tmp_path / student.name
        s = run_distill(distill_config(cache=str(world.cache), student=str(student), out=str(out), lr=1e-3,
                                      batch_size=4, max_steps=2, save_every=0, progress=False))
        assert s["steps"] == 2 and s["samples"] == 24
        assert all(np.isfinite(v) for v in s["final_losses"].values()) and set(s["final_losses"]) == {
            "loss", "sft", "kd", "iva", "tpa"}
        model = AutoModelForImageTextToText.from_pretrained(out / "final")
        hidden.append(model.config.text_config.hidden_size)
    assert hidden == [32, 48]


def test_sft_from_corpus_trains_only_the_projector(world, tmp_path):
    out = tmp_path / "out"
    s = run_distill(distill_config(data=str(world.corpus), image_root=str(world.shapes), student=str(world.student),
                                  out=str(out), recipe="sft", train="projector", lr=1e-2, batch_size=8,
                                  max_steps=2, save_every=0, progress=False))
    assert s["samples"] == 24 and set(s["final_losses"]) == {"loss", "sft"}
    before, after = weights(world.student), weights(out / "final")
    assert set(before) == set(after)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    projector = {k for k in before if "multi_modal_projector" in k}
    assert projector and changed == projector


def test_bad_inputs_fail_before_writing(world, tmp_path):
    with pytest.raises(AlignTIError, match="--recipe sft"):
        distill_config(data=str(world.corpus), student=str(world.student), out=str(tmp_path / "x"), recipe="kd")
    with pytest.raises(AlignTIError, match="--cache"):
        distill_config(student=str(world.student), out=str(tmp_path / "x"))
    with pytest.raises(AlignTIError, match="must be >= 1"):
        distill_config(cache=str(world.cache), student=str(world.student), out=str(tmp_path / "x"), grad_accum=0)
    # a student with another tokenizer: refused by the cache, nothing written
    other_tok = train_tokenizer(["completely different words here"] * 8, vocab_size=300)  # merges differ
    m, p = build_tiny_llava(TinySpec(hidden=32), other_tok)
    other = save_model_dir(m, p, tmp_path / "other")
    with pytest.raises(AlignTIError, match="tokenizer"):
        run_distill(distill_config(cache=str(world.cache), student=str(other), out=str(tmp_path / "o1"),
                                  progress=False))
    assert not (tmp_path / "o1").exists()
    # an existing output needs --resume or --overwrite; --overwrite never deletes foreign data
    (tmp_path / "o2").mkdir()
    (tmp_path / "o2" / "precious.txt").write_text("x")
    base = dict(cache=str(world.small_cache), student=str(world.student), out=str(tmp_path / "o2"), progress=False)
    with pytest.raises(AlignTIError, match="already exists"):
        run_distill(distill_config(**base))
    with pytest.raises(AlignTIError, match="not written by alignti distill"):
        run_distill(distill_config(overwrite=True, **base))
    assert (tmp_path / "o2" / "precious.txt").exists()
    (tmp_path / "o3").mkdir()
    (tmp_path / "o3" / "distill.json").write_text("{}")  # a run's output, reached through a link
    (tmp_path / "link").symlink_to(tmp_path / "o3")
    with pytest.raises(AlignTIError, match="is a symbolic link; pass the directory itself"):
        run_distill(distill_config(overwrite=True, **dict(base, out=str(tmp_path / "link"))))
    assert (tmp_path / "link").is_symlink() and (tmp_path / "o3" / "distill.json").is_file()


def test_method_doc_lists_every_option():
    doc = (Path(__file__).resolve().parents[2] / "docs" / "method.md").read_text()
    names = [path[-1] for path, _, _ in leaves(DistillConfig)]  # every option, the nested loss options too
    assert "recipe" in names and "tpa_weighting" in names
    missing = [n for n in names if f"`--{n.replace('_', '-')}" not in doc]
    assert not missing, f"docs/method.md does not document {missing}"


def test_gradient_checkpointing_and_bf16(world, tmp_path):
    base = dict(cache=str(world.small_cache), student=str(world.student), lr=1e-3, batch_size=4, max_steps=2,
                save_every=0, progress=False)
    run_distill(distill_config(out=str(tmp_path / "plain"), **base))
    run_distill(distill_config(out=str(tmp_path / "ckpt"), gradient_checkpointing=True, **base))
    a, b = weights(tmp_path / "plain" / "final"), weights(tmp_path / "ckpt" / "final")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-7, msg=k)
    s = run_distill(distill_config(out=str(tmp_path / "bf16"), dtype="bf16", **base))
    assert all(np.isfinite(v) for v in s["final_losses"].values())
    assert all(v.dtype == torch.float32 for v in weights(tmp_path / "bf16" / "final").values())  # student's dtype
