"""`alignti assemble`: pretrained parts (tiny random LM and vision dirs built here) and --random."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    SiglipConfig,
    SiglipImageProcessorPil,
    SiglipModel,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from alignti.errors import AlignTIError
from alignti.models.assemble import AssembleConfig, corpus_texts, run_assemble
from alignti.models.fingerprint import fingerprint_model_dir, tokenizer_compatible
from alignti.models.tokenizer import CHAT_TEMPLATE, IMAGE_TOKEN

TEXTS = ["what colour is the red circle in the picture", "is there a green triangle yes no", "count the squares"]
LM_TEMPLATE = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"


def _lm_tokenizer(with_template: bool) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer like an LM's: no `<image>` token."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(TEXTS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    if with_template:
        fast.chat_template = LM_TEMPLATE
    return fast


def _save_lm(root, family: str, tied: bool, extra_rows: int, with_template: bool):
    tokenizer = _lm_tokenizer(with_template)
    assert IMAGE_TOKEN not in tokenizer.get_vocab()
    common = dict(vocab_size=len(tokenizer) + extra_rows, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied, pad_token_id=0)
    torch.manual_seed(1)
    if family == "qwen2":
        lm = Qwen2ForCausalLM(Qwen2Config(**common))
    elif family == "qwen3":
        lm = Qwen3ForCausalLM(Qwen3Config(head_dim=8, **common))
    else:
        lm = LlamaForCausalLM(LlamaConfig(**common))
    path = root / f"lm_{family}"
    lm.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _save_vision(root, kind: str):
    torch.manual_seed(2)
    sizes = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                 patch_size=8)
    path = root / f"vision_{kind}"
    if kind == "siglip":
        SiglipVisionModel(SiglipVisionConfig(**sizes)).save_pretrained(path)
    elif kind == "clip":
        CLIPVisionModel(CLIPVisionConfig(**sizes)).save_pretrained(path)
    else:  # a full SigLIP (text + vision) directory with its own image processor
        text = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=64)
        SiglipModel(SiglipConfig(text_config=text, vision_config=sizes)).save_pretrained(path)
        SiglipImageProcessorPil(size={"height": 32, "width": 32}, image_mean=[0.1, 0.2, 0.3]).save_pretrained(path)
    return path


def _image(seed: int) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray(torch.randint(0, 256, (40, 48, 3), generator=g, dtype=torch.uint8).numpy())


# (LM family, tied embeddings, padded embedding rows, LM has a chat template, vision dir kind)
CASES = [
    ("qwen2", False, 0, False, "siglip"),
    ("llama", True, 0, True, "clip"),
    ("qwen3", False, 5, True, "siglip_full"),
]


@pytest.mark.parametrize("family,tied,extra_rows,with_template,kind", CASES)
def test_assemble_pretrained(tmp_path, family, tied, extra_rows, with_template, kind):
    lm_dir = _save_lm(tmp_path, family, tied, extra_rows, with_template)
    vision_dir = _save_vision(tmp_path, kind)
    out = run_assemble(AssembleConfig(out=str(tmp_path / "out"), llm=str(lm_dir), vision=str(vision_dir)))

    model = AutoModelForImageTextToText.from_pretrained(out).eval()
    processor = AutoProcessor.from_pretrained(out, backend="pil")
    src_lm = AutoModelForCausalLM.from_pretrained(lm_dir).eval()
    tower_cls = CLIPVisionModel if kind == "clip" else SiglipVisionModel
    src_tower = tower_cls.from_pretrained(vision_dir).eval()

    # Tokenizer: `<image>` added; rows grow only when the tokenizer outgrew the embedding.
    tokenizer = processor.tokenizer
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    assert model.config.image_token_id == image_id == processor.image_token_id
    n_src = src_lm.config.vocab_size
    rows = model.get_input_embeddings().weight.shape[0]
    assert rows == max(n_src, len(tokenizer))
    assert (image_id >= n_src) == (extra_rows == 0)
    assert processor.chat_template == (LM_TEMPLATE if with_template else CHAT_TEMPLATE)

    # LM weights: exactly the source's, except the appended embedding/lm_head rows.
    src_sd, out_sd = src_lm.model.state_dict(), model.model.language_model.state_dict()
    assert set(src_sd) == set(out_sd)
    for name, tensor in src_sd.items():
        assert torch.equal(out_sd[name][: tensor.shape[0]], tensor), name
        if name != "embed_tokens.weight":
            assert out_sd[name].shape == tensor.shape, name
    assert torch.equal(model.lm_head.weight[:n_src], src_lm.lm_head.weight)
    assert (model.lm_head.weight is model.get_input_embeddings().weight) == tied
    tower_sd = model.model.vision_tower.state_dict()
    assert {k: v.shape for k, v in tower_sd.items()} == {k: v.shape for k, v in src_tower.state_dict().items()}
    assert all(torch.equal(tower_sd[k], v) for k, v in src_tower.state_dict().items())

    # Text-only forward equals the source LM on its vocabulary.
    ids = tokenizer("is there a green triangle", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits[..., :n_src], src_lm(input_ids=ids).logits)

    # Image features: the source tower's penultimate layer (CLS dropped for CLIP) through the projector.
    inputs = processor(images=_image(0), text=f"{IMAGE_TOKEN}\ncount the squares", return_tensors="pt")
    n_v = int((inputs["input_ids"] == image_id).sum())
    fp = fingerprint_model_dir(out)
    assert n_v == fp["n_vision_tokens"] == 16
    assert (fp["vocab_size"], fp["tokenizer_size"], fp["num_hidden_layers"]) == (rows, len(tokenizer), 2)
    with torch.no_grad():
        hidden = src_tower(inputs["pixel_values"], output_hidden_states=True).hidden_states[-2]
        expected = model.model.multi_modal_projector(hidden[:, 1:] if kind == "clip" else hidden)
        got = model.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output[0]
        torch.testing.assert_close(got, expected[0])
        logits = model(**inputs).logits
        other_image = processor(images=_image(1), text=f"{IMAGE_TOKEN}\ncount the squares", return_tensors="pt")
        other = model(**other_image).logits
    assert logits.shape == (1, inputs["input_ids"].shape[1], rows) and torch.isfinite(logits).all()
    assert not torch.allclose(logits[0, -1], other[0, -1])  # the image reaches the LM


def test_assemble_pretrained_is_deterministic_and_seeded(tmp_path):
    lm_dir, vision_dir = _save_lm(tmp_path, "qwen2", False, 0, True), _save_vision(tmp_path, "siglip")
    fps = [fingerprint_model_dir(run_assemble(AssembleConfig(out=str(tmp_path / name), llm=str(lm_dir),
                                                             vision=str(vision_dir), seed=seed)))
           for name, seed in (("a", 0), ("b", 0), ("c", 1))]
    assert fps[0] == fps[1]
    assert fps[0]["weights"] != fps[2]["weights"]  # fresh projector and `<image>` row follow the seed
    assert {k for k in fps[0] if fps[0][k] != fps[2][k]} == {"weights"}


def test_assemble_takes_the_lm_dtype(tmp_path):
    """A bf16 LM with an fp32 tower: one bf16 model, LM bits unchanged, tower cast."""
    lm_dir, vision_dir = _save_lm(tmp_path, "qwen2", False, 0, True), _save_vision(tmp_path, "siglip")
    src_lm = AutoModelForCausalLM.from_pretrained(lm_dir).to(torch.bfloat16)
    src_lm.save_pretrained(lm_dir)
    out = run_assemble(AssembleConfig(out=str(tmp_path / "out"), llm=str(lm_dir), vision=str(vision_dir)))
    model = AutoModelForImageTextToText.from_pretrained(out)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    out_sd = model.model.language_model.state_dict()
    assert all(torch.equal(out_sd[k][: v.shape[0]], v) for k, v in src_lm.model.state_dict().items())
    tower_sd = model.model.vision_tower.state_dict()
    src_tower = SiglipVisionModel.from_pretrained(vision_dir)
    assert all(torch.equal(tower_sd[k], v.to(torch.bfloat16)) for k, v in src_tower.state_dict().items())


def test_assemble_refuses_bad_input_and_keeps_out(tmp_path):
    lm_dir, vision_dir = _save_lm(tmp_path, "qwen2", False, 0, True), _save_vision(tmp_path, "siglip")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    good = dict(out=str(out), llm=str(lm_dir), vision=str(vision_dir))
    bad = [
        dict(good),  # non-empty out without --overwrite
        dict(good, out=str(tmp_path / "o2"), projector="linear"),
        dict(good, out=str(tmp_path / "o3"), vision=str(lm_dir)),  # not a vision model
        dict(good, out=str(tmp_path / "o4"), llm=str(vision_dir)),  # not a causal LM
        dict(good, out=str(tmp_path / "o5"), llm=str(tmp_path / "missing")),
        dict(good, out=str(tmp_path / "o6"), vision=None),
        dict(good, out=str(tmp_path), overwrite=True),  # would delete its own inputs
        dict(out=str(tmp_path / "o7"), random=True),  # neither --corpus nor --tokenizer-from
        dict(out=str(tmp_path / "o8"), random=True, llm=str(lm_dir)),
    ]
    for kwargs in bad:
        with pytest.raises(AlignTIError):
            run_assemble(AssembleConfig(**kwargs))
    assert (out / "keep.txt").read_text() == "mine"
    assert not any((tmp_path / f"o{i}").exists() for i in range(2, 9))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lm_qwen2", "out", "vision_siglip"]  # no temp dirs left

    # --overwrite deletes only a directory assemble made (it holds assemble.json), never other data.
    with pytest.raises(AlignTIError, match="not made by alignti assemble"):
        run_assemble(AssembleConfig(**good, overwrite=True))
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    made = tmp_path / "made"
    run_assemble(AssembleConfig(**dict(good, out=str(made))))
    assert json.loads((made / "assemble.json").read_text())["options"]["llm"] == str(lm_dir)
    (made / "config.json").write_text("{}")
    run_assemble(AssembleConfig(**dict(good, out=str(made)), overwrite=True))
    assert json.loads((made / "config.json").read_text())["model_type"] == "llava"
    link = tmp_path / "link"
    link.symlink_to(made)  # --overwrite through a link: refused in one line, the model kept
    with pytest.raises(AlignTIError, match="is a symbolic link; pass the directory itself"):
        run_assemble(AssembleConfig(**dict(good, out=str(link)), overwrite=True))
    assert link.is_symlink() and (made / "assemble.json").is_file()


def _write_corpus(path, jsonl: bool) -> None:
    rows = [{"id": str(i), "image": f"{i}.png", "conversations": [
        {"from": "human", "value": f"{IMAGE_TOKEN}\nWhat colour is the octagon number {i}?"},
        {"from": "gpt", "value": "The octagon is vermilion."}]} for i in range(6)]
    if jsonl:
        path.write_text("\n".join(json.dumps(r) for r in rows) + "\n{not json\n\n")
    else:
        path.write_text(json.dumps(rows))


def test_corpus_texts_reads_json_and_jsonl(tmp_path):
    for jsonl in (False, True):
        path = tmp_path / f"c.json{'l' if jsonl else ''}"
        _write_corpus(path, jsonl)
        texts = corpus_texts(path)
        assert len(texts) == 12 and texts[0] == "What colour is the octagon number 0?" and IMAGE_TOKEN not in texts[0]
    (tmp_path / "empty.json").write_text("[]")
    with pytest.raises(AlignTIError):
        corpus_texts(tmp_path / "empty.json")


def test_assemble_random_teacher_and_student_share_tokenizer(tmp_path):
    corpus = tmp_path / "train.jsonl"
    _write_corpus(corpus, jsonl=True)
    teacher = run_assemble(AssembleConfig(out=str(tmp_path / "t"), random=True, corpus=str(corpus), vocab_size=300,
                                          text_family="qwen3"))
    student = run_assemble(AssembleConfig(out=str(tmp_path / "s"), random=True, tokenizer_from=str(teacher),
                                          text_family="llama", hidden=32, layers=1, heads=2, kv_heads=1, seed=3))
    ft, fs = fingerprint_model_dir(teacher), fingerprint_model_dir(student)
    assert tokenizer_compatible(ft, fs) is None
    assert (ft["num_hidden_layers"], fs["num_hidden_layers"]) == (2, 1)
    assert ft["n_vision_tokens"] == fs["n_vision_tokens"] == 16
    assert ft["vocab_size"] == fs["vocab_size"] == ft["tokenizer_size"]

    pt, ps = (AutoProcessor.from_pretrained(d, backend="pil") for d in (teacher, student))
    text = "What colour is the octagon number 7? vermilion"
    assert pt.tokenizer(text)["input_ids"] == ps.tokenizer(text)["input_ids"]
    assert len(pt.tokenizer(" octagon vermilion")["input_ids"]) <= 4  # trained on the corpus words
    model = AutoModelForImageTextToText.from_pretrained(student).eval()
    assert model.config.text_config.model_type == "llama" and model.config.text_config.hidden_size == 32
    with torch.no_grad():
        logits = model(**ps(images=_image(0), text=f"{IMAGE_TOKEN}{text}", return_tensors="pt")).logits
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_assemble_random_qwen_vl_teacher_and_student(tmp_path, family):
    """Qwen-VL students share the teacher's tokenizer and template; the fingerprint's vision rule follows
    the image processor's resolution settings (no fixed n_vision_tokens: it varies per image)."""
    corpus = tmp_path / "train.jsonl"
    _write_corpus(corpus, jsonl=True)
    teacher = run_assemble(AssembleConfig(out=str(tmp_path / "t"), random=True, family=family, corpus=str(corpus),
                                          vocab_size=300))
    student = run_assemble(AssembleConfig(out=str(tmp_path / "s"), random=True, family=family,
                                          tokenizer_from=str(teacher), hidden=32, layers=1, seed=3))
    other = run_assemble(AssembleConfig(out=str(tmp_path / "o"), random=True, family=family,
                                        tokenizer_from=str(teacher), hidden=32, min_pixels=32 * 32, max_pixels=64 * 48))
    ft, fs, fo = (fingerprint_model_dir(d) for d in (teacher, student, other))
    assert tokenizer_compatible(ft, fs) is None and tokenizer_compatible(ft, fo) is None
    assert ft["vision_grid"] == fs["vision_grid"] != fo["vision_grid"]
    assert not {"n_vision_tokens"} & (set(ft) | set(fs))
    model = AutoModelForImageTextToText.from_pretrained(student)
    assert model.config.model_type == family and model.config.text_config.hidden_size == 32


def test_assemble_family_options_are_checked_before_anything_is_written(tmp_path):
    lm_dir, vision_dir = _save_lm(tmp_path, "qwen2", False, 0, True), _save_vision(tmp_path, "siglip")
    corpus = tmp_path / "train.jsonl"
    _write_corpus(corpus, jsonl=True)
    with pytest.raises(AlignTIError, match="--llm/--vision assemble LLaVA models; --family qwen2_5_vl needs --random"):
        run_assemble(AssembleConfig(out=str(tmp_path / "a"), llm=str(lm_dir), vision=str(vision_dir),
                                    family="qwen2_5_vl"))
    with pytest.raises(AlignTIError, match="head size"):
        run_assemble(AssembleConfig(out=str(tmp_path / "b"), random=True, family="qwen3_vl", corpus=str(corpus),
                                    hidden=24, heads=4, kv_heads=2))
    with pytest.raises(AlignTIError, match="min_pixels"):
        run_assemble(AssembleConfig(out=str(tmp_path / "c"), random=True, family="qwen2_vl", corpus=str(corpus),
                                    min_pixels=100))
    assert not any((tmp_path / n).exists() for n in "abc")


def test_the_torch_free_family_names_are_the_registry():
    """`assemble --family` choices come from models/specs.py (no torch); the registry is families()."""
    from alignti.models.family import families
    from alignti.models.specs import FAMILY_NAMES

    assert FAMILY_NAMES == tuple(families())
