"""`alignti assemble`: build a LLaVA model directory, from pretrained parts or tiny and random.

Pretrained mode (`--llm DIR --vision DIR`) is how Align-TI's students start: a pretrained causal
LM and a SigLIP/CLIP vision tower, joined by a fresh 2-layer MLP projector (LLaVA's
`mlp2x_gelu`: linear-GELU-linear). The LM's and the tower's weights are copied unchanged; the
LM's tokenizer gets an `<image>` token if it lacks one.

Vision features follow LLaVA-1.5 for both towers: the penultimate layer
(`vision_feature_layer=-2`), as LLaVA-1.5 (CLIP) and the SigLIP-based LLaVA-style models
(LLaVA-MoD / Bunny / LLaVA-OneVision) do. CLIP prepends a CLS token, so it uses strategy
"default" (drop CLS, `num_additional_image_tokens=1`); SigLIP has none, so it uses "full".

Random mode (`--random`) builds a tiny model of `--family` (LLaVA, `alignti.models.llava`, or
Qwen2-VL / Qwen2.5-VL / Qwen3-VL, `alignti.models.qwen_vl_tiny`) with a tokenizer trained on a
corpus or reused from another model directory (so a student shares a teacher's token ids exactly).

The output is written into a temporary sibling directory and renamed into place when
complete, so an interrupted run never leaves a half-written model at `--out`. It holds
`assemble.json` (the options it was built with), the mark `--overwrite` needs before it deletes
a non-empty `--out`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForCausalLM,
    AutoTokenizer,
    CLIPImageProcessorPil,
    CLIPVisionModel,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    SiglipImageProcessorPil,
    SiglipVisionModel,
)
from transformers.image_processing_utils import BaseImageProcessor
from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

from alignti.errors import AlignTIError
from alignti.models.config import AssembleConfig
from alignti.models.family import get_family, save_model_dir
from alignti.models.llava import LLAVA
from alignti.models.tokenizer import CHAT_TEMPLATE, IMAGE_TOKEN, ensure_image_token, train_tokenizer
from alignti.storage.files import write_json_atomic

log = logging.getLogger(__name__)

ASSEMBLE_JSON = "assemble.json"  # written into every model directory assemble makes
PROJECTORS = ("mlp2x_gelu",)
VISION_FEATURE_LAYER = -2
# model_type in a vision directory's config.json -> (tower class, strategy, extra tokens).
VISION_KINDS = {
    "siglip_vision_model": ("siglip", SiglipVisionModel, "full", 0),
    "siglip": ("siglip", SiglipVisionModel, "full", 0),
    "clip_vision_model": ("clip", CLIPVisionModel, "default", 1),
    "clip": ("clip", CLIPVisionModel, "default", 1),
}
SIGLIP_MEAN_STD = ([0.5, 0.5, 0.5], [0.5, 0.5, 0.5])
CLIP_MEAN_STD = ([0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711])

def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())


def run_assemble(cfg: AssembleConfig) -> Path:
    """Build the model directory `cfg.out` and return its path. Validates everything first."""
    out = _check_config(cfg)
    tmp = out.parent / f".{out.name}.assemble-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        if cfg.random:
            _build_random(cfg, tmp)
        else:
            _build_pretrained(cfg, tmp)
        # The mark that this directory is ours: only such a directory may a later --overwrite delete.
        write_json_atomic(tmp / ASSEMBLE_JSON, {"created_by": "alignti assemble", "options": asdict(cfg)}, indent=1)
        if out.exists():
            shutil.rmtree(out)  # empty, or made by assemble and --overwrite (checked above)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out


def _check_config(cfg: AssembleConfig) -> Path:
    if cfg.projector not in PROJECTORS:
        raise AlignTIError(f"unknown projector {cfg.projector!r}; supported: {', '.join(PROJECTORS)}")
    if cfg.random:
        if cfg.llm or cfg.vision:
            raise AlignTIError("--random builds a model from scratch: drop --llm/--vision")
        if (cfg.corpus is None) == (cfg.tokenizer_from is None):
            raise AlignTIError("--random needs exactly one of --corpus FILE or --tokenizer-from DIR")
        if cfg.corpus is not None and not Path(cfg.corpus).is_file():
            raise AlignTIError(f"corpus file {cfg.corpus!r} does not exist")
        if cfg.tokenizer_from is not None and not Path(cfg.tokenizer_from).is_dir():
            raise AlignTIError(f"--tokenizer-from directory {cfg.tokenizer_from!r} does not exist")
        sizes = (cfg.hidden, cfg.layers, cfg.heads, cfg.kv_heads, cfg.vision_hidden, cfg.vision_layers,
                 cfg.image_size, cfg.patch, cfg.min_pixels, cfg.max_pixels)
        if min(sizes) < 1:
            raise AlignTIError("model sizes (--hidden, --layers, --heads, ...) must be positive integers")
        if cfg.corpus is not None and cfg.vocab_size < 300:
            raise AlignTIError("--vocab-size must be at least 300 (256 byte symbols + special tokens + merges)")
        _spec(cfg)  # validates the sizes before anything is written
    else:
        if cfg.family != "llava":
            raise AlignTIError(f"--llm/--vision assemble LLaVA models; --family {cfg.family} needs --random")
        if not cfg.llm or not cfg.vision:
            raise AlignTIError("assemble needs --llm DIR and --vision DIR (or --random)")
        if cfg.corpus is not None or cfg.tokenizer_from is not None:
            raise AlignTIError("--corpus/--tokenizer-from apply to --random only; the LM's tokenizer is used")
        for what, p in (("--llm", cfg.llm), ("--vision", cfg.vision)):
            if not (Path(p) / "config.json").is_file():
                raise AlignTIError(f"{what} directory {p!r} has no config.json (not a saved model)")
    out = Path(cfg.out).absolute()
    if out.is_symlink():  # the model is renamed into place at --out, which --overwrite deletes first
        raise AlignTIError(f"--out {str(out)!r} is a symbolic link; pass the directory itself ({str(out.resolve())!r})")
    if out.exists() and not out.is_dir():
        raise AlignTIError(f"--out {str(out)!r} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not cfg.overwrite:
            raise AlignTIError(f"--out {str(out)!r} exists and is not empty; pass --overwrite to replace it")
        if not (out / ASSEMBLE_JSON).is_file():
            raise AlignTIError(f"--out {str(out)!r} is not empty and was not made by alignti assemble (no "
                               f"{ASSEMBLE_JSON}); refusing to delete it")
    for src in (cfg.llm, cfg.vision, cfg.corpus, cfg.tokenizer_from):
        # --overwrite deletes --out: never let that take an input with it.
        if src is not None and Path(src).resolve().is_relative_to(out.resolve()):
            raise AlignTIError(f"--out {str(out)!r} contains the input {src!r}; choose another output directory")
    return out


def _spec(cfg: AssembleConfig) -> Any:
    """The family's tiny spec from the size options (validated there)."""
    return get_family(cfg.family).random_spec(cfg.sizes())


# ---------------------------------------------------------------- random mode


def corpus_texts(path: str | Path) -> list[str]:
    """Every conversation `value` string of a LLaVA JSON (list) or JSONL corpus, `<image>` removed.

    Only what tokenizer training needs; malformed lines and rows are skipped here (the corpus
    reader reports them as rejects when the corpus is actually used).
    """
    text = Path(path).read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise AlignTIError(f"corpus {str(path)!r} is not valid JSON: {e}") from None
    else:
        rows = []
        for line in filter(str.strip, text.splitlines()):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    texts = []
    for row in rows if isinstance(rows, list) else []:
        turns = row.get("conversations") if isinstance(row, dict) else None
        for turn in turns if isinstance(turns, list) else []:
            value = turn.get("value") if isinstance(turn, dict) else None
            if isinstance(value, str) and value.strip():
                texts.append(value.replace(IMAGE_TOKEN, " ").strip())
    if not texts:
        raise AlignTIError(f"corpus {str(path)!r} has no conversation text to train a tokenizer on")
    return texts


def _build_random(cfg: AssembleConfig, tmp: Path) -> None:
    if cfg.corpus is not None:
        # Role names appear in every rendered turn; give the trainer a chance to merge them.
        tokenizer = train_tokenizer(corpus_texts(cfg.corpus) + ["system", "user", "assistant"], cfg.vocab_size)
    else:
        tokenizer = _load_tokenizer(cfg.tokenizer_from)
    model, parts = get_family(cfg.family).build_random(_spec(cfg), tokenizer)
    save_model_dir(model, parts, tmp)


def _load_tokenizer(path: str) -> PreTrainedTokenizerBase:
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise AlignTIError(f"cannot load a tokenizer from {path!r}: {_one_line(e)}") from None
    if not tokenizer.chat_template:
        log.warning("tokenizer in %s has no chat template; using alignti's ChatML template", path)
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


# ---------------------------------------------------------------- pretrained mode


def _build_pretrained(cfg: AssembleConfig, tmp: Path) -> None:
    # Cheap checks first, the (possibly many-GB) LM last.
    lm_config = _lm_config(cfg.llm)
    tokenizer = _load_tokenizer(cfg.llm)
    ensure_image_token(tokenizer)
    tower, kind = _load_vision(cfg.vision)
    _, _, strategy, n_extra = VISION_KINDS[kind]
    image_processor = _image_processor(cfg.vision, tower.config, kind)
    size = _processed_size(image_processor)
    if size != (tower.config.image_size, tower.config.image_size):
        raise AlignTIError(
            f"the vision processor makes {size[0]}x{size[1]} images but the tower expects "
            f"{tower.config.image_size}x{tower.config.image_size}")
    lm = _load_lm(cfg.llm, lm_config)
    if len(tokenizer) > lm.get_input_embeddings().weight.shape[0]:
        # Grow only: padded vocabularies (Qwen: 151936 rows > len(tokenizer)) already have a
        # free row for `<image>`. Existing rows are kept; new ones are seeded.
        torch.manual_seed(cfg.seed)
        lm.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    processor = LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=tower.config.patch_size,
        vision_feature_select_strategy=strategy, chat_template=tokenizer.chat_template, image_token=IMAGE_TOKEN,
        num_additional_image_tokens=n_extra,
    )
    n_v = (size[0] // tower.config.patch_size) * (size[1] // tower.config.patch_size)
    model = _join(lm, tower, processor.image_token_id, strategy, n_v, cfg.seed)
    save_model_dir(model, LLAVA.parts_of(processor), tmp)


def _lm_config(path: str) -> PretrainedConfig:
    """The LM's config, refused unless it is a causal LM with a base model LLaVA can rebuild."""
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    except (OSError, ValueError, KeyError) as e:
        raise AlignTIError(f"cannot read the --llm config in {path!r}: {_one_line(e)}") from None
    if type(config) not in AutoModelForCausalLM._model_mapping or type(config) not in AutoModel._model_mapping:
        raise AlignTIError(f"--llm {path!r} is a {config.model_type!r} model, not a causal LM")
    return config


def _load_lm(path: str, config: PretrainedConfig) -> PreTrainedModel:
    """The causal LM in its stored dtype."""
    try:
        lm = AutoModelForCausalLM.from_pretrained(path, dtype="auto", trust_remote_code=False)
    except (OSError, ValueError, KeyError) as e:
        raise AlignTIError(f"cannot load the causal LM in {path!r}: {_one_line(e)}") from None
    base = getattr(lm, lm.base_model_prefix, None)
    if type(base) is not AutoModel._model_mapping[type(config)]:
        # LlavaModel rebuilds the LM with AutoModel.from_config; the weights must land there.
        raise AlignTIError(f"--llm {path!r} ({config.model_type}) has no standard base model to put inside LLaVA")
    return lm.eval()


def _load_vision(path: str) -> tuple[PreTrainedModel, str]:
    """The vision tower (a full SigLIP/CLIP directory gives its vision part) and its kind."""
    model_type = json.loads((Path(path) / "config.json").read_text()).get("model_type")
    if model_type not in VISION_KINDS:
        raise AlignTIError(
            f"--vision {path!r} is a {model_type!r} model; supported: SigLIP or CLIP ({', '.join(VISION_KINDS)})")
    kind, cls, _, _ = VISION_KINDS[model_type]
    try:
        tower, info = cls.from_pretrained(path, dtype="auto", output_loading_info=True, trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise AlignTIError(f"cannot load the vision tower from {path!r}: {_one_line(e)}") from None
    if info["missing_keys"] or info["mismatched_keys"]:
        raise AlignTIError(f"--vision {path!r} lacks vision weights: {sorted(info['missing_keys'])[:3]}")
    return tower.eval(), kind


def _image_processor(path: str, vision_config: PretrainedConfig, kind: str) -> BaseImageProcessor:
    """The vision directory's image processor (PIL backend), else one from the tower's image size."""
    if (Path(path) / "preprocessor_config.json").is_file():
        return AutoImageProcessor.from_pretrained(path, backend="pil", trust_remote_code=False)
    side = vision_config.image_size
    if kind == "clip":
        mean, std = CLIP_MEAN_STD
        return CLIPImageProcessorPil(size={"shortest_edge": side}, crop_size={"height": side, "width": side},
                                     image_mean=mean, image_std=std)
    mean, std = SIGLIP_MEAN_STD
    return SiglipImageProcessorPil(size={"height": side, "width": side}, image_mean=mean, image_std=std)


def _processed_size(image_processor: BaseImageProcessor) -> tuple[int, int]:
    """(height, width) of pixel_values for an odd-sized probe image: LLaVA needs a fixed grid."""
    pixels = image_processor(Image.new("RGB", (61, 37)), return_tensors="pt")["pixel_values"]
    return int(pixels.shape[-2]), int(pixels.shape[-1])


def _join(lm: PreTrainedModel, tower: PreTrainedModel, image_token_id: int, strategy: str, n_v: int,
          seed: int) -> LlavaForConditionalGeneration:
    """LLaVA around the loaded LM and tower (moved in, not copied) plus a fresh projector.

    The whole model takes the LM's dtype (LLaVA runs its tower in the LM's dtype); a tower
    stored in another precision is cast, everything else is bit-identical to the sources.
    """
    dtype = lm.dtype
    config = LlavaConfig(
        vision_config=tower.config, text_config=lm.config, image_token_id=image_token_id,
        vision_feature_select_strategy=strategy, vision_feature_layer=VISION_FEATURE_LAYER,
        projector_hidden_act="gelu", image_seq_length=n_v, tie_word_embeddings=lm.config.tie_word_embeddings,
    )
    config.dtype = dtype
    # On the meta device nothing is allocated or initialised: a 7B LM is not built twice.
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    model.model.language_model = getattr(lm, lm.base_model_prefix)
    model.lm_head = lm.get_output_embeddings()
    model.model.vision_tower = tower.to(dtype)
    torch.manual_seed(seed)
    # nn.Linear's own initialisation, as LLaVA's projector builder leaves it.
    model.model.multi_modal_projector = LlavaMultiModalProjector(config).to(dtype)
    model.generation_config = lm.generation_config
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise ValueError(f"LLaVA parts left unset after assembly: {left[:3]}")
    return model.eval()
