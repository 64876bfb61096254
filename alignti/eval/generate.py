"""Batched greedy answers to benchmark questions, written to a resumable answers JSONL.

A question becomes one user turn (`<image>\\n` + its prompt for image questions) rendered with the
model's chat template up to the assistant's first token, tokenised and its image token expanded
to the image's vision tokens by `SampleEncoder.encode_prompt`, the tokenisation path training
uses, then left-padded by `collate` and turned into `generate`'s inputs by the model's family
(Qwen-VL adds the image-token types its M-RoPE needs). Decoding is plain greedy
from a fresh `GenerationConfig`: a model's own generation_config.json (temperature, top-p,
repetition penalty of chat models) would otherwise change the argmax path. It stops at the
tokenizer's eos and the template's end-of-turn token.

Each batch's records are appended, flushed and fsynced before the next batch starts, so a killed
run loses at most one batch; `load_answers` ignores a last line cut short, and
`repair_answers_tail` removes it before the next append.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import GenerationConfig, PreTrainedModel

from alignti.data.batching import collate
from alignti.data.corpus import IMAGE_PLACEHOLDER
from alignti.data.encode import SampleEncoder
from alignti.errors import AlignTIError
from alignti.eval.formats import EvalQuestion, open_image
from alignti.models.family import ModelParts, family_of
from alignti.progress import progress_bar

# Every public benchmark's prompt asks for a word, a phrase or a letter, and greedy decoding stops
# at end-of-turn; the cap only bounds a model that rambles. TextVQA answers (OCR strings) run
# longest. Our shapes corpus is written in one of several answer styles (a reasoning runs to ~32
# tokens), so its cap follows its own gold answers instead (`default_max_new_tokens`); 16 is its floor.
MAX_NEW_TOKENS = {"gqa": 16, "textvqa": 32, "pope": 16, "mme": 16, "scienceqa": 16, "mmbench": 16, "shapes": 16}
CAP_FROM_GOLD = frozenset({"shapes"})
_PROBE = "zq1"  # an assistant text that no template rewrites, to find the end-of-turn token


@dataclass(frozen=True)
class Generator:
    """A loaded model with everything a batch of questions needs."""

    model: PreTrainedModel
    parts: ModelParts
    encoder: SampleEncoder
    stop_ids: tuple[int, ...]
    pad_id: int
    max_new_tokens: int


def stop_token_ids(encoder: SampleEncoder, model: PreTrainedModel) -> tuple[int, ...]:
    """The tokenizer's eos, the model's generation eos ids and the template's end-of-turn token.

    The end-of-turn token (`<|im_end|>`, `<|eot_id|>`, `</s>`) is the first token after an
    assistant turn's content in the rendered template, if it is an added (special) token.
    """
    tok = encoder.tokenizer
    ids: list[int] = []
    for src in (tok.eos_token_id, model.generation_config.eos_token_id):
        ids.extend(src if isinstance(src, (list, tuple)) else [] if src is None else [src])
    text = encoder.render((("user", "x"), ("assistant", _PROBE)))
    tail = text[text.rindex(_PROBE) + len(_PROBE):]
    tail_ids = tok(tail, add_special_tokens=False)["input_ids"] if tail else []
    special = set(tok.get_added_vocab().values()) - {encoder.image_token_id}
    if tail_ids and tail_ids[0] in special:
        ids.append(tail_ids[0])
    if not ids:
        raise AlignTIError("the tokenizer has no eos token and the chat template no end-of-turn token")
    return tuple(dict.fromkeys(int(i) for i in ids))


def make_generator(model: PreTrainedModel, parts: ModelParts, max_new_tokens: int) -> Generator:
    """Set up left-padded greedy generation for `model` with its parts."""
    encoder = SampleEncoder(parts, image_root=None)
    stop = stop_token_ids(encoder, model)
    pad_id = parts.tokenizer.pad_token_id if parts.tokenizer.pad_token_id is not None else stop[0]
    return Generator(model, parts, encoder, stop, pad_id, max_new_tokens)


def default_max_new_tokens(benchmark: str, questions: Sequence[EvalQuestion], tokenizer) -> int:
    """The generated-token cap when --max-new-tokens is not given.

    `MAX_NEW_TOKENS[benchmark]`; for a benchmark in CAP_FROM_GOLD (shapes) at least twice its
    longest gold answer in the model's tokens, so a right answer in any answer style fits with
    room to spare and a short-answer split keeps the floor. Every question passed counts (not only
    those left to answer), so a resumed run keeps its cap.
    """
    cap = MAX_NEW_TOKENS[benchmark]
    if benchmark in CAP_FROM_GOLD:
        golds = [q.answer for q in questions if isinstance(q.answer, str) and q.answer]
        longest = max((len(ids) for ids in tokenizer(golds, add_special_tokens=False)["input_ids"]), default=0)
        cap = max(cap, 2 * longest)
    return cap


def has_image(question: EvalQuestion) -> bool:
    """Whether the question comes with an image (a file under the root, or MMBench's inline one)."""
    return question.image is not None or bool(question.image_b64)


def user_turn(question: EvalQuestion) -> str:
    """The question's user turn: `<image>` + newline + its prompt for image questions."""
    return f"{IMAGE_PLACEHOLDER}\n{question.prompt}" if has_image(question) else question.prompt


def generate_batch(gen: Generator, questions: Sequence[EvalQuestion], image_root: str | Path | None) -> list[str]:
    """Greedy answers, stripped, one per question (inputs left-padded to [B, T])."""
    samples = [gen.encoder.encode_prompt(str(q.question_id), user_turn(q), open_image(q, image_root) if has_image(q)
                                         else None) for q in questions]
    # generation appends on the right: prompts must end at the same column
    batch = collate(samples, gen.pad_id, padding_side="left").to(gen.model.device, gen.model.dtype)
    inputs = family_of(gen.model.config).generation_inputs(gen.model, batch)
    config = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=gen.max_new_tokens,
                              eos_token_id=list(gen.stop_ids), pad_token_id=gen.pad_id)
    with torch.inference_mode():
        out = gen.model.generate(**inputs, generation_config=config)
    new_tokens = out[:, inputs["input_ids"].shape[1]:]  # [B, <= max_new_tokens], eos/pad after the answer
    texts = gen.parts.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    return [t.strip() for t in texts]


def answer_record(question: EvalQuestion, text: str, model_id: str) -> dict:
    """One answers-JSONL record (docs/eval.md, "Answers JSONL")."""
    return {"question_id": question.question_id, "prompt": question.prompt, "text": text, "model_id": model_id,
            "benchmark": question.benchmark}


def repair_answers_tail(path: Path) -> None:
    """Make the file end with a newline: drop a last line a killed run cut short, or finish one
    that is complete JSON, so the next append starts a fresh line."""
    if not path.is_file():
        return
    data = path.read_bytes()
    if not data or data.endswith(b"\n"):
        return
    cut = data.rfind(b"\n") + 1
    try:
        json.loads(data[cut:])
        complete = True
    except ValueError:
        complete = False
    with path.open("r+b") as f:
        if complete:
            f.seek(0, os.SEEK_END)
            f.write(b"\n")
        else:
            f.truncate(cut)
        f.flush()
        os.fsync(f.fileno())


def append_answers(path: Path, records: Sequence[dict]) -> None:
    """Append records as JSON lines and force them to disk before returning."""
    with path.open("a", encoding="utf-8") as f:
        f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        f.flush()
        os.fsync(f.fileno())


def batches(items: Sequence[EvalQuestion], size: int) -> Iterator[Sequence[EvalQuestion]]:
    """Consecutive slices of `size` (the last may be shorter), in file order."""
    for start in range(0, len(items), size):
        yield items[start:start + size]


def answer_questions(gen: Generator, questions: Sequence[EvalQuestion], answers_path: str | Path,
                     image_root: str | Path | None, model_id: str, batch_size: int) -> int:
    """Answer `questions` batch by batch, appending each batch to `answers_path`; returns how many."""
    path = Path(answers_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    repair_answers_tail(path)
    bench = questions[0].benchmark if questions else ""
    bar = progress_bar(total=len(questions), desc=f"eval {bench}", unit="q")
    done = 0
    for batch in batches(questions, batch_size):
        texts = generate_batch(gen, batch, image_root)
        append_answers(path, [answer_record(q, t, model_id) for q, t in zip(batch, texts)])
        done += len(batch)
        bar.update(len(batch))
    bar.close()
    return done
