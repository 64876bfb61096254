"""The real-width world of `scale.py` and `gpu_check.py`: random LLaVA models at the paper's
widths (reduced depth) and a corpus of ~900-token samples.

- teacher: Qwen2.5-7B text widths (hidden 3,584, 28 heads, 4 KV heads, intermediate 18,944,
  vocabulary 152,064: the padded one), untied LM head;
- student: Qwen2.5-0.5B text widths (896, 14 heads, 2 KV heads, 4,864, vocabulary 151,936),
  tied embeddings;
- both: a SigLIP-so400m tower (1,152, 16 heads, 4,304, patch 14, 384 px: 27 x 27 = 729 vision
  tokens) and LLaVA's 2-layer MLP projector;
- corpus: shapes images at 384 px with a ~45-word instruction and a ~120-word answer drawn from a
  fixed word list, so a sample is 729 vision + ~55 prompt + ~120 response tokens.

The tokenizer is the in-process BPE one trained on the corpus (about 1k ids, so every corpus id
is far below both vocabularies); the embedding and head rows above it are the models' padding,
random like the rest. Qwen's checkpoints store bf16; so do these (`save_model_dir` after
`.to(bfloat16)`), which also halves what is written and hashed.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import LlavaConfig, LlavaForConditionalGeneration, Qwen2Config, SiglipVisionConfig

from alignti.data.shapes import ShapesConfig, run_shapes
from alignti.models.family import save_model_dir
from alignti.models.llava import LLAVA, build_processor
from alignti.models.tokenizer import ensure_image_token, train_tokenizer

FULL_DEPTH = {"student": 24, "teacher": 28, "tower": 27}  # Qwen2.5-0.5B, Qwen2.5-7B, SigLIP-so400m


@dataclass(frozen=True)
class TextWidths:
    hidden: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tied: bool


@dataclass(frozen=True)
class Widths:
    """Every width of the world; REAL is the paper's, QUICK a small stand-in to check scripts run."""

    student: TextWidths
    teacher: TextWidths
    tower_hidden: int
    tower_heads: int
    tower_intermediate: int
    image: int
    patch: int
    prompt_words: int
    answer_words: int

    @property
    def n_v(self) -> int:
        return (self.image // self.patch) ** 2


REAL = Widths(student=TextWidths(896, 14, 2, 4864, 151_936, True),
              teacher=TextWidths(3584, 28, 4, 18_944, 152_064, False), tower_hidden=1152, tower_heads=16,
              tower_intermediate=4304, image=384, patch=14, prompt_words=45, answer_words=120)  # 729 vision tokens
QUICK = Widths(student=TextWidths(128, 4, 2, 256, 4096, True), teacher=TextWidths(256, 4, 2, 512, 4224, False),
               tower_hidden=64, tower_heads=4, tower_intermediate=128, image=112, patch=14, prompt_words=10,
               answer_words=20)
WORDS = ("red green blue yellow purple orange circle square triangle small large left right top bottom corner "
         "centre object shape colour image picture shows there is are the a an of in on with near far next "
         "above below beside between inside outside bright dark round sharp edge side first second third "
         "many few none one two three count which where what how answer question look find describe").split()


def llava_config(text: TextWidths, w: Widths, layers: int, tower_layers: int, image_token_id: int,
                 pad_id: int) -> LlavaConfig:
    """LLaVA (SigLIP tower, strategy "full", last tower layer) around a Qwen2 decoder of `text` widths."""
    lm = Qwen2Config(vocab_size=text.vocab, hidden_size=text.hidden, intermediate_size=text.intermediate,
                     num_hidden_layers=layers, num_attention_heads=text.heads, num_key_value_heads=text.kv_heads,
                     max_position_embeddings=32_768, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
                     tie_word_embeddings=text.tied, pad_token_id=pad_id)
    vision = SiglipVisionConfig(num_hidden_layers=tower_layers, image_size=w.image, patch_size=w.patch,
                                hidden_size=w.tower_hidden, num_attention_heads=w.tower_heads,
                                intermediate_size=w.tower_intermediate)
    return LlavaConfig(vision_config=vision, text_config=lm, image_token_id=image_token_id,
                       vision_feature_select_strategy="full", vision_feature_layer=-1, image_seq_length=w.n_v,
                       projector_hidden_act="gelu", tie_word_embeddings=text.tied)


def _words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def build_corpus(out: Path, n: int, w: Widths) -> Path:
    """Shapes images at w.image px with long instructions and answers; returns the corpus path."""
    run_shapes(ShapesConfig(out=str(out), n=n, seed=0, image_size=w.image, test_fraction=0.0))
    rows = json.loads((out / "train.json").read_text())[:n]
    rng = random.Random(0)
    long_rows = [{"id": r["id"], "image": r["image"], "conversations": [
        {"from": "human", "value": f"<image>\n{r['conversations'][0]['value'].replace('<image>', '').strip()} "
                                   f"{_words(rng, w.prompt_words)}"},
        {"from": "gpt", "value": _words(rng, w.answer_words)}]} for r in rows]
    path = out / "long.json"
    path.write_text(json.dumps(long_rows))
    return path


def build_models(work: Path, corpus: Path, w: Widths, layers: int, tower_layers: int,
                 roles: tuple[str, ...] = ("teacher", "student")) -> dict[str, Path]:
    """Random teacher and student directories (bf16 weights) sharing one tokenizer."""
    texts = [t["value"].replace("<image>", " ") for r in json.loads(corpus.read_text()) for t in r["conversations"]]
    tokenizer = train_tokenizer(texts + ["system", "user", "assistant"], vocab_size=1024)
    image_token_id = ensure_image_token(tokenizer)
    out = {}
    for role in roles:
        text = w.teacher if role == "teacher" else w.student
        config = llava_config(text, w, layers, tower_layers, image_token_id, tokenizer.pad_token_id)
        torch.manual_seed(0 if role == "teacher" else 1)
        model = LlavaForConditionalGeneration(config).eval().to(torch.bfloat16)
        out[role] = save_model_dir(model, LLAVA.parts_of(build_processor(tokenizer, w.image, w.patch)), work / role)
        del model
    return out
