"""The distill tests' worlds, built once per session and shared by every test module here.

- `SignalWorld` (`make_signal_world`): an in-process tiny teacher run through `TeacherPass` over a
  small shapes corpus, its signals kept in memory and written to a cache, plus an in-process student
  (another family and seed) sharing the teacher's tokenizer: for tests that compare the cache with
  the teacher's in-memory signals and call the objective directly.
- `RunWorld` (`run_world`): saved teacher and student directories and caches made by `run_extract`,
  for tests that run `alignti distill` end to end (in-process or as the CLI).
"""

from __future__ import annotations

import functools
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText, AutoProcessor

from alignti.data.batching import collate
from alignti.data.corpus import read_corpus
from alignti.data.encode import SampleEncoder
from alignti.data.shapes import ShapesConfig, run_shapes
from alignti.cliargs import build, to_argv
from alignti.distill.config import DistillConfig, LossConfig
from alignti.distill.objective import Objective, probe_layers
from alignti.extract.run import ExtractConfig, run_extract
from alignti.extract.teacher import HfTeacher
from alignti.models.fingerprint import fingerprint_model_dir
from alignti.models.family import save_model_dir
from alignti.models.llava import TinySpec, build_tiny_llava
from alignti.models.tokenizer import train_tokenizer
from alignti.storage.schema import CacheManifest, CacheSettings, SampleSignals
from alignti.storage.writer import CacheWriter

TEXTS = [
    "What colour is the red circle? The answer is blue square top left.",
    "Is there a green triangle? yes no. How many objects are there? 1 2 3 4",
    "Describe the picture. A small purple square at the bottom right.",
]
SETTINGS = CacheSettings(top_k=8, tpa_d=2, tpa_top_k=4, iva_layer=1, iva_max_positions=4, iva_top_k=4)


@functools.lru_cache(maxsize=1)
def tokenizer():
    return train_tokenizer(TEXTS * 4, vocab_size=300)


def sharpen(model, scale: float):
    """Scale every weight (peaked, position-dependent distributions instead of near-uniform ones)
    and zero the image token's LM-head row: trained LLaVA models never predict it, and extract
    refuses it as a TPA candidate."""
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(scale)
        model.get_output_embeddings().weight[model.config.image_token_id] = 0.0
    return model


def student_model(spec: TinySpec = TinySpec(text_family="llama", seed=1), tok=None):
    """A student built with the teacher's tokenizer (ids line up), of another family and seed."""
    model, processor = build_tiny_llava(spec, tok or tokenizer())
    return sharpen(model, 2.0), processor


@dataclass
class SignalWorld:
    teacher: torch.nn.Module
    teacher_encoder: SampleEncoder
    student: torch.nn.Module
    student_processor: object
    data: str
    image_root: str
    cache: str
    signals: list[SampleSignals]  # in memory, straight from HfTeacher

    @property
    def pad_id(self) -> int:
        return tokenizer().pad_token_id

    @property
    def image_token_id(self) -> int:
        return self.teacher.config.image_token_id

    def student_encoder(self, image_root: str | None = None, max_length: int = 512) -> SampleEncoder:
        return SampleEncoder(self.student_processor, image_root, max_length)


def make_signal_world(tmp: Path, settings: CacheSettings = SETTINGS, n: int = 6) -> SignalWorld:
    """Tiny teacher -> HfTeacher over a shapes corpus -> CacheWriter; plus a student."""
    teacher, processor = build_tiny_llava(TinySpec(), tokenizer())
    sharpen(teacher, 4.0)
    teacher_dir = save_model_dir(teacher, processor, tmp / "teacher")
    run_shapes(ShapesConfig(out=str(tmp / "shapes"), n=n, seed=1))
    data = str(tmp / "shapes" / "train.json")
    encoder = SampleEncoder(processor, str(tmp / "shapes"), 512)
    samples = [encoder.encode(r) for r in read_corpus(data)]
    pad = tokenizer().pad_token_id
    signals = HfTeacher(teacher, settings, pad, chunk_size=5)(collate(samples, pad))
    manifest = CacheManifest.create(fingerprint_model_dir(teacher_dir), settings,
                                    extra={"data": data, "image_root": str(tmp / "shapes")})
    with CacheWriter.open(tmp / "cache", manifest, part_size=4) as writer:  # two parts
        for sig in signals:
            writer.add(sig)
    student, student_processor = student_model()
    return SignalWorld(teacher, encoder, student, student_processor, data, str(tmp / "shapes"), str(tmp / "cache"), signals)


@dataclass(frozen=True)
class RunWorld:
    shapes: Path  # image root; train.json is the corpus
    corpus: Path
    teacher: Path
    student: Path  # hidden 32
    student_b: Path  # hidden 48
    cache: Path  # 24 samples
    small_cache: Path  # 4 samples (one batch of 4)


@functools.lru_cache(maxsize=None)
def build_world(root: str) -> RunWorld:
    base = Path(root)
    shapes = base / "shapes"
    run_shapes(ShapesConfig(out=str(shapes), n=24, seed=1))
    corpus = shapes / "train.json"
    texts = [t["value"] for r in json.loads(corpus.read_text()) for t in r["conversations"]]
    tokenizer = train_tokenizer(texts, vocab_size=200)
    teacher, processor = build_tiny_llava(TinySpec(hidden=64, layers=2), tokenizer)
    with torch.no_grad():  # peaked teacher distributions: KD / IVA / TPA targets far from uniform
        for p in teacher.parameters():
            p.mul_(4.0)
    save_model_dir(teacher, processor, base / "teacher")
    for name, spec in (("student", TinySpec(hidden=32, layers=2, seed=1)),
                       ("student_b", TinySpec(hidden=48, layers=2, seed=2))):
        model, proc = build_tiny_llava(spec, tokenizer)
        save_model_dir(model, proc, base / name)
    common = dict(teacher=str(base / "teacher"), data=str(corpus), image_root=str(shapes), top_k=8, tpa_d=2,
                  tpa_top_k=4, iva_layer="1", iva_max_positions=8, iva_top_k=4, batch_size=8, max_length=256)
    run_extract(ExtractConfig(out=str(base / "cache"), **common))
    run_extract(ExtractConfig(out=str(base / "small_cache"), limit=4, **common))
    return RunWorld(shapes, corpus, base / "teacher", base / "student", base / "student_b", base / "cache",
                 base / "small_cache")


def run_world(tmp_path_factory: pytest.TempPathFactory) -> RunWorld:
    return build_world(str(tmp_path_factory.getbasetemp() / "distill-world"))


def read_log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(model_dir / "model.safetensors"))


def generate_once(model_dir: Path, world: RunWorld) -> torch.Tensor:
    """Reload with the Auto classes and greedily generate a few tokens for one corpus image."""
    model = AutoModelForImageTextToText.from_pretrained(model_dir).eval()
    processor = AutoProcessor.from_pretrained(model_dir, backend="pil")
    row = json.loads(world.corpus.read_text())[0]
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is the circle?"}]}]
    prompt = processor.apply_chat_template(chat, add_generation_prompt=True)
    image = Image.open(world.shapes / row["image"]).convert("RGB")
    inputs = processor(images=[image], text=prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    return out[0, inputs["input_ids"].shape[1]:]


def objective_terms(model: torch.nn.Module, batch, cfg: LossConfig, cache_layer: int | None = SETTINGS.iva_layer,
                    cache_depth: int | None = 2) -> dict:
    """The production objective's terms for one batch, its probe layers resolved as distill resolves them."""
    layers = probe_layers(cfg, model.config.get_text_config().num_hidden_layers, cache_layer, cache_depth)
    return Objective(model, cfg, *layers)(batch)


def distill_config(**options) -> DistillConfig:
    """A DistillConfig from flat option values, as the command line gives them (`--recipe kd` -> recipe="kd")."""
    return build(DistillConfig, options)


def distill_cli(**options) -> list[str]:
    """The `alignti distill` command line (as a subprocess argv) of a run given as flat options."""
    return [sys.executable, "-m", "alignti", "distill", *to_argv(distill_config(**options))]


def cli_summary(stdout: str) -> dict:
    """The JSON summary `alignti distill` prints last on stdout (after its one-line intro)."""
    lines = stdout.splitlines()
    start = max(i for i, line in enumerate(lines) if line == "{")
    return json.loads("\n".join(lines[start:]))
