"""Generation: prompts as training renders them, stop tokens, left padding, the answers file's tail,
and a model trained to answer a question answers it through `alignti eval`."""

import json

import pytest
import torch
from PIL import Image

from alignti.data.batching import collate
from alignti.data.corpus import CorpusRow
from alignti.data.encode import IGNORE_INDEX, SampleEncoder
from alignti.eval.formats import EvalQuestion
from alignti.eval.generate import (
    MAX_NEW_TOKENS, append_answers, default_max_new_tokens, generate_batch, make_generator, repair_answers_tail,
    stop_token_ids, user_turn,
)
from alignti.eval.run import EvalConfig, run_eval
from alignti.models.family import load_parts
from alignti.models.loading import load_model
from alignti.models.tokenizer import IM_END


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_model(tiny_model_dir), load_parts(tiny_model_dir)


def _image_root(tmp_path):
    root = tmp_path / "img"
    root.mkdir()
    for name, color in (("red", (255, 0, 0)), ("blue", (0, 0, 255)), ("green", (0, 255, 0))):
        Image.new("RGB", (20, 24), color).save(root / f"{name}.png")
    return root


def _q(qid, prompt, image, answer="x", benchmark="shapes"):
    return EvalQuestion(benchmark, qid, qid, prompt, image, answer, {"question_type": "color"})


def test_shapes_cap_follows_the_longest_gold_answer(tiny):
    """A reasoning answer longer than 16 tokens gets room; short answers keep the floor of 16."""
    tok = tiny[1].tokenizer
    reasoning = ("The top left quadrant holds a red circle. The top right quadrant holds a red square. "
                 "The bottom left quadrant holds a red triangle. The answer is 3.")
    n = len(tok(reasoning, add_special_tokens=False)["input_ids"])
    assert n > 16
    short = [_q("1", "How many red objects are there?", None, "3"), _q("2", "What colour?", None, "yellow")]
    assert default_max_new_tokens("shapes", short, tok) == 16
    long = short + [_q("3", "How many red objects are there?", None, reasoning)]
    assert default_max_new_tokens("shapes", long, tok) == 2 * n
    assert default_max_new_tokens("gqa", [_q("3", "q", None, reasoning, "gqa")], tok) == MAX_NEW_TOKENS["gqa"]


@pytest.mark.parametrize("image", ["red.png", None])
def test_prompt_ids_equal_the_training_encoding_up_to_the_answer(tiny, tmp_path, image):
    model, processor = tiny
    root = _image_root(tmp_path)
    question = _q("1", "What colour is the square?", image)
    user = ("<image>\n" if image else "") + question.prompt
    # Training's path: render the whole conversation, tokenise, expand the image token; the answer
    # starts at the first labelled token.
    sample = SampleEncoder(processor, str(root)).encode(CorpusRow("1", image, (("user", user), ("assistant", "red"))))
    first_label = int((sample.labels != IGNORE_INDEX).nonzero()[0])
    gen = make_generator(model, processor, max_new_tokens=2)
    loaded = Image.open(root / image).convert("RGB") if image else None
    prompt = gen.encoder.encode_prompt("1", user_turn(question), loaded)
    assert prompt.input_ids.tolist() == sample.input_ids[:first_label].tolist()
    assert (prompt.labels == IGNORE_INDEX).all() and prompt.n_v == sample.n_v == (16 if image else 0)  # (32 / 8)^2
    # and the LLaVA processor's own expansion of the rendered prompt gives the same ids
    text = gen.encoder.render((("user", user_turn(question)),), add_generation_prompt=True)
    ids = processor.settings["processor"](text=[text], images=[loaded] if image else None, return_tensors="pt",
                                          add_special_tokens=False)["input_ids"][0]
    assert ids.tolist() == prompt.input_ids.tolist()


def test_stop_tokens_include_the_templates_end_of_turn(tiny):
    model, processor = tiny
    gen = make_generator(model, processor, max_new_tokens=2)
    im_end = processor.tokenizer.convert_tokens_to_ids(IM_END)
    assert stop_token_ids(gen.encoder, model) == (im_end,)  # eos is <|im_end|> too: listed once
    assert gen.pad_id == processor.tokenizer.pad_token_id


def test_left_padded_batch_equals_one_question_at_a_time(tiny, tmp_path):
    model, processor = tiny
    root = _image_root(tmp_path)
    gen = make_generator(model, processor, max_new_tokens=5)
    questions = [_q("1", "What colour is the square?", "red.png"),
                 _q("2", "Is there a green triangle in the picture? yes no", None),  # text-only, longer
                 _q("3", "Describe.", "blue.png")]
    batched = generate_batch(gen, questions, root)
    single = [generate_batch(gen, [q], root)[0] for q in questions]
    assert batched == single
    assert all(t == t.strip() for t in batched)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_qwen_vl_left_padded_batch_equals_one_question_at_a_time(tmp_path, family):
    """M-RoPE under left padding: images of two sizes, and a batch of text-only questions."""
    from alignti.models.family import get_family
    from tests.helpers.models import sharpen, tokenizer

    root = _image_root(tmp_path)
    Image.new("RGB", (80, 48), (0, 0, 255)).save(root / "wide.png")
    fam = get_family(family)
    model, parts = fam.build_random(fam.random_spec({"patch": 8}), tokenizer())
    with torch.no_grad():  # never predict the image token (a real VLM does not; fed back it has no image)
        sharpen(model).get_output_embeddings().weight[model.config.image_token_id] = 0.0
    gen = make_generator(model, parts, max_new_tokens=5)
    mixed = [_q("1", "What colour is the square?", "red.png"),
             _q("2", "Is there a green triangle in the picture? yes no", None), _q("3", "Describe.", "wide.png")]
    text = [_q("4", "What?", None), _q("5", "Is there a green triangle in the picture? yes no", None)]
    for questions in (mixed, text):
        assert generate_batch(gen, questions, root) == [generate_batch(gen, [q], root)[0] for q in questions]
    # generate runs M-RoPE: its greedy tokens equal full forwards of the growing sequence, positions the
    # model's own (without mm_token_type_ids generate would silently number the tokens 1-D)
    from alignti.models.family import family_of
    from tests.helpers.families import own_inputs

    for q in (mixed[0], mixed[2]):
        sample = gen.encoder.encode_prompt(q.question_id, user_turn(q), Image.open(root / q.image).convert("RGB"))
        inputs = family_of(model.config).generation_inputs(model, collate([sample], gen.pad_id, "left"))
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=4, do_sample=False, pad_token_id=gen.pad_id)[0]
            ids = sample.input_ids
            for _ in range(4):
                ids = torch.cat([ids, model(**own_inputs(model, ids, sample.images)).logits[0, -1:].argmax(-1)])
        assert out.tolist() == ids.tolist()


def test_repair_tail(tmp_path):
    path = tmp_path / "answers.jsonl"
    path.write_text('{"question_id": 1, "text": "a"}\n{"question_id": 2, "te')  # killed mid-line
    repair_answers_tail(path)
    assert path.read_text() == '{"question_id": 1, "text": "a"}\n'
    path.write_text('{"question_id": 1, "text": "a"}')  # complete record, no newline (hand-written file)
    repair_answers_tail(path)
    append_answers(path, [{"question_id": 2, "text": "b"}])
    assert [json.loads(x)["question_id"] for x in path.read_text().splitlines()] == [1, 2]


def _train_to_answer(tmp_path, cases):
    """A tiny model overfitted, through the training tokenisation path, to answer `cases`."""
    from alignti.models.family import save_model_dir
    from alignti.models.llava import TinySpec, build_tiny_llava
    from alignti.models.tokenizer import train_tokenizer

    tokenizer = train_tokenizer([q + " " + a for _, q, a in cases] * 8, vocab_size=280)
    model, processor = build_tiny_llava(TinySpec(seed=1), tokenizer)
    root = _image_root(tmp_path)
    enc = SampleEncoder(processor, str(root))
    rows = [CorpusRow(n, f"{n}.png", (("user", f"<image>\n{q}"), ("assistant", a))) for n, q, a in cases]
    batch = collate([enc.encode(r) for r in rows], tokenizer.pad_token_id)
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    model.train()
    for _ in range(40):
        loss = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                     **batch.images, labels=batch.labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1
    return save_model_dir(model.eval(), processor, tmp_path / "trained"), root


def test_a_model_trained_to_answer_gives_that_answer(tmp_path):
    # red and blue share the question: only the image tells them apart; the answers must stop
    # at <|im_end|> although 8 new tokens are allowed.
    cases = [("red", "What colour is the square?", "red"), ("blue", "What colour is the square?", "blue"),
             ("green", "How many circles are there?", "2")]
    model_dir, root = _train_to_answer(tmp_path, cases)
    records = [{"id": n, "image": f"{n}.png", "question_type": "color", "answer": a,
                "conversations": [{"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": a}]}
               for n, q, a in cases]
    (root / "test.json").write_text(json.dumps(records))
    res = run_eval(EvalConfig(out=str(tmp_path / "out"), benchmark="shapes", questions=str(root / "test.json"),
                              image_root=str(root), model=str(model_dir), batch_size=2, max_new_tokens=8))
    texts = [json.loads(x)["text"] for x in (tmp_path / "out" / "answers.jsonl").read_text().splitlines()]
    assert texts == ["red", "blue", "2"]
    assert res["score"] == 100.0
