import json

import numpy as np
import pytest
import torch
from PIL import Image

from alignti.data import corpus as C
from alignti.data.batching import collate, length_grouped
from alignti.data.corpus import parse_row, read_corpus
from alignti.data.encode import IGNORE_INDEX, SampleEncoder
from alignti.models.family import load_parts


@pytest.fixture(scope="module")
def processor(tiny_model_dir):
    return load_parts(tiny_model_dir)


@pytest.fixture()
def root(tmp_path):
    (tmp_path / "img").mkdir()
    Image.new("RGB", (40, 30), (0, 200, 0)).save(tmp_path / "img" / "a.png")
    (tmp_path / "img" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    return tmp_path


def row(convs, image="img/a.png", id_="s1"):
    obj = {"id": id_, "conversations": [{"from": f, "value": v} for f, v in convs]}
    if image:
        obj["image"] = image
    return parse_row(obj, "fallback")


def test_single_turn_labels_vision_instruction(processor, root):
    enc = SampleEncoder(processor, str(root), 512)
    s = enc.encode(row([("human", "<image>\nWhat colour is the circle?"), ("gpt", "red circle")]))
    tok = processor.tokenizer
    assert [tok.decode(s.input_ids[a:b]) for a, b in s.label_spans] == ["red circle<|im_end|>"]
    # labels equal input ids exactly where labelled
    lab = s.labels != IGNORE_INDEX
    assert torch.equal(s.labels[lab], s.input_ids[lab])
    img_id = tok.convert_tokens_to_ids("<image>")
    assert s.n_v == 16 and s.vision_positions.numel() == 16
    assert torch.all(s.input_ids[s.vision_positions] == img_id)
    assert torch.equal(s.vision_positions, torch.arange(s.vision_start, s.vision_start + 16))
    assert int((s.input_ids == img_id).sum()) == 16
    assert tok.decode(s.input_ids[s.instruction_positions]).strip() == "What colour is the circle?"
    # response positions predict exactly the labelled tokens
    assert torch.equal(s.input_ids[s.resp_positions + 1], s.labels[lab])
    # same ids and pixels as the processor's own expansion
    ref = processor.settings["processor"](text=enc.render(row([("human", "<image>\nWhat colour is the circle?"),
                                          ("gpt", "red circle")]).turns),
                    images=Image.open(root / "img" / "a.png"), return_tensors="pt")
    assert torch.equal(ref["input_ids"][0], s.input_ids)
    assert torch.equal(ref["pixel_values"], s.images.tensors["pixel_values"])
    assert (s.text_ids == img_id).sum() == 1 and s.text_ids.dtype == np.int32


def test_instruction_keeps_a_first_word_with_a_leading_space(processor, root):
    """Tokens overlapping the user text are instruction tokens: ' is' (its space outside the stripped
    text) counts; the newline after <image>, whitespace alone, does not."""
    enc = SampleEncoder(processor, str(root), 512)
    tok = processor.tokenizer
    for text, want in (("<image> is there a red circle?", "is there a red circle?"),
                       ("<image>\nWhat colour is the circle?", "What colour is the circle?"),
                       ("What colour is it? <image>", "What colour is it?")):
        s = enc.encode(row([("human", text), ("gpt", "yes")]))
        pieces = [tok.decode(s.input_ids[p:p + 1]) for p in s.instruction_positions]
        assert "".join(pieces).strip() == want, pieces
        assert pieces[0].strip() and pieces[-1].strip(), pieces  # no whitespace-only token at either end


def test_multi_turn_and_system(processor, root):
    enc = SampleEncoder(processor, str(root), 512)
    r = row([("system", "Be brief."), ("human", "<image>\nIs there a green triangle?"), ("gpt", "yes"),
             ("human", "How many objects are there?"), ("gpt", "3")])
    s = enc.encode(r)
    tok = processor.tokenizer
    assert [tok.decode(s.input_ids[a:b]) for a, b in s.label_spans] == ["yes<|im_end|>", "3<|im_end|>"]
    instr = tok.decode(s.input_ids[s.instruction_positions])
    assert instr.replace(" ", "") == "Isthereagreentriangle?Howmanyobjectsarethere?"
    assert "Be brief" not in instr


def test_text_only(processor, root):
    s = SampleEncoder(processor, str(root), 512).encode(row([("human", "Describe it."), ("gpt", "a square")], image=None))
    assert s.images is None and s.n_v == 0 and s.vision_positions.numel() == 0 and s.vision_start == -1
    assert processor.tokenizer.decode(s.input_ids[s.label_spans[0][0]:s.label_spans[0][1]]) == "a square<|im_end|>"


@pytest.mark.parametrize("convs,image,reason", [
    ([("human", "<image>\nq"), ("gpt", "a")], "img/missing.png", C.MISSING_IMAGE),
    ([("human", "<image>\nq"), ("gpt", "a")], "img/bad.png", C.CORRUPT_IMAGE),
    ([("human", "<image>\nq"), ("gpt", "a")], "../../etc/passwd", C.PATH_OUTSIDE_ROOT),
    ([("human", "<image>\nq"), ("gpt", "a")], "/etc/passwd", C.PATH_OUTSIDE_ROOT),
    ([("human", "<image>\nq")], "img/a.png", C.NO_ASSISTANT_TURN),
    ([("human", "<image>\n<image>\nq"), ("gpt", "a")], "img/a.png", C.IMAGE_TOKEN_MISMATCH),
    ([("human", "q"), ("gpt", "a")], "img/a.png", C.IMAGE_TOKEN_MISMATCH),
    ([("human", "<image>\nq"), ("gpt", "a")], None, C.IMAGE_TOKEN_MISMATCH),
    ([("human", "<image>\n" + "What colour is the circle? " * 40), ("gpt", "a")], "img/a.png", C.TOO_LONG),
])
def test_rejects(processor, root, convs, image, reason):
    r = row(convs, image=image)
    out = r if isinstance(r, C.Reject) else SampleEncoder(processor, str(root), 128).encode(r)
    assert isinstance(out, C.Reject) and out.reason == reason and out.source_id == "s1"


def test_read_corpus_json_and_jsonl(tmp_path):
    good = {"id": "a", "image": "x.png", "conversations": [{"from": "human", "value": "<image>\nq"},
                                                          {"from": "gpt", "value": "a"}]}
    (tmp_path / "c.json").write_text(json.dumps([good, {"id": "b"}, 3]))
    out = list(read_corpus(tmp_path / "c.json"))
    assert isinstance(out[0], C.CorpusRow) and out[0].image == "x.png"
    assert [o.reason for o in out[1:]] == [C.MALFORMED_ROW, C.MALFORMED_ROW]
    (tmp_path / "c.jsonl").write_text(json.dumps(good) + "\n{broken\n\n" + json.dumps({**good, "id": "c"}) + "\n")
    out = list(read_corpus(tmp_path / "c.jsonl"))
    assert [getattr(o, "source_id") for o in out] == ["a", "line-2", "c"]
    assert isinstance(out[1], C.Reject) and out[1].reason == C.MALFORMED_ROW


def test_sample_id_is_content_hash(processor, root):
    enc = SampleEncoder(processor, str(root), 512)
    a = enc.encode(row([("human", "<image>\nq"), ("gpt", "a")], id_="one"))
    b = enc.encode(row([("human", "<image>\nq"), ("gpt", "a")], id_="two"))
    c = enc.encode(row([("human", "<image>\nq"), ("gpt", "b")], id_="one"))
    assert a.sample_id == b.sample_id != c.sample_id


def test_collate_and_length_grouping(processor, root):
    enc = SampleEncoder(processor, str(root), 512)
    samples = [enc.encode(row([("human", "<image>\n" + "q " * n), ("gpt", "a")], id_=str(n))) for n in (1, 9, 3, 7)]
    batches = list(length_grouped(samples, batch_size=2))
    assert [[s.source_id for s in b] for b in batches] == [["1", "3"], ["7", "9"]]
    pad = processor.tokenizer.pad_token_id
    for side in ("right", "left"):
        b = collate(samples, pad, side)
        assert b.images["pixel_values"].shape[0] == 4
        for i, s in enumerate(samples):
            o = int(b.offsets[i])
            assert torch.equal(b.input_ids[i, o:o + s.length], s.input_ids)
            assert int(b.attention_mask[i].sum()) == s.length
            assert torch.equal(b.labels[i, o:o + s.length], s.labels)
