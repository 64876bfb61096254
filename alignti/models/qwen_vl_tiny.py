"""Tiny random Qwen2-VL, Qwen2.5-VL and Qwen3-VL models built in-process (the Qwen-VL family's
`build_random`, `alignti.models.qwen_vl`), with a tokenizer that carries Qwen-VL's vision tokens
and template.

The sizes follow the real checkpoints' proportions (mrope sections, window attention in
Qwen2.5-VL's tower, Qwen3-VL's learnt position grid and deepstack), so every code path the real
models take runs on CPU in milliseconds.
"""

from __future__ import annotations


import torch
from tokenizers import Tokenizer
from transformers import (
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessorPil,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
)

from alignti.errors import AlignTIError
from alignti.models.specs import QwenVLSpec
from alignti.models.tokenizer import IM_END, PAD_TOKEN

_MODELS = {"qwen2_vl": (Qwen2VLConfig, Qwen2VLForConditionalGeneration),
           "qwen2_5_vl": (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration),
           "qwen3_vl": (Qwen3VLConfig, Qwen3VLForConditionalGeneration)}

# The names the Qwen-VL processors look up on the tokenizer (processing_qwen2_vl.py:36-47,
# processing_qwen3_vl.py:53-68); their defaults are these same strings.
VISION_TOKENS = {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                 "vision_start_token": "<|vision_start|>", "vision_end_token": "<|vision_end|>"}

# ChatML as alignti's tokenizer has it, with Qwen-VL's image marker (the processor expands the
# `<|image_pad|>` between start and end). Qwen's own template also adds a default system turn.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def qwen_tokenizer(tokenizer: PreTrainedTokenizerFast) -> PreTrainedTokenizerFast:
    """A copy of alignti's trained tokenizer with Qwen-VL's vision tokens (appended ids) and template.

    The four tokens are named special tokens (`tokenizer.image_token` etc.), which is how the
    processors find them and how `save_pretrained` keeps them.
    """
    backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    backend.add_special_tokens(list(VISION_TOKENS.values()))
    out = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=IM_END, pad_token=PAD_TOKEN,
                                  extra_special_tokens=dict(VISION_TOKENS))
    out.chat_template = CHAT_TEMPLATE
    return out


def _mrope_section(head_dim: int, interleaved: bool) -> list[int]:
    """Rotary frequency pairs per axis (t, h, w), summing to head_dim / 2.

    Real checkpoints: [16, 24, 24] for head_dim 128 (Qwen2/2.5-VL, axes in blocks) and
    [24, 20, 20] interleaved (Qwen3-VL). The tiny split keeps the same proportions.
    """
    half = head_dim // 2
    hw = (half * 5) // 16 if interleaved else (half * 3) // 8
    return [half - 2 * hw, hw, hw]


def _text_config(spec: QwenVLSpec, tokenizer: PreTrainedTokenizerBase) -> dict:
    head_dim = spec.hidden // spec.heads
    interleaved = spec.family == "qwen3_vl"
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": _mrope_section(head_dim, interleaved)}
    if interleaved:
        rope["mrope_interleaved"] = True
    text = dict(vocab_size=len(tokenizer), hidden_size=spec.hidden, intermediate_size=spec.hidden * 2,
                num_hidden_layers=spec.layers, num_attention_heads=spec.heads, num_key_value_heads=spec.kv_heads,
                max_position_embeddings=4096, pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id, rope_parameters=rope)
    if spec.family == "qwen3_vl":
        text["head_dim"] = head_dim
    else:  # Qwen2/2.5-VL text configs default to the real vocabulary's bos id (151643)
        text["bos_token_id"] = None
    return text


def _vision_config(spec: QwenVLSpec) -> dict:
    """Each family names its vision sizes differently (configuration_qwen*_vl.py)."""
    common = dict(depth=spec.vision_layers, num_heads=spec.vision_hidden // 16, patch_size=spec.patch,
                  spatial_merge_size=spec.merge, temporal_patch_size=2)
    if spec.family == "qwen2_vl":  # embed_dim = tower width, hidden_size = merger output (the LM's)
        return dict(common, embed_dim=spec.vision_hidden, hidden_size=spec.hidden, mlp_ratio=2)
    out = dict(common, hidden_size=spec.vision_hidden, intermediate_size=spec.vision_hidden * 2,
               out_hidden_size=spec.hidden)
    if spec.family == "qwen2_5_vl":
        # windows of 2 x 2 merged tokens; the last block attends over the whole image
        return dict(out, window_size=2 * spec.merge * spec.patch, fullatt_block_indexes=[spec.vision_layers - 1])
    # Qwen3-VL: learnt 8 x 8 position grid (interpolated to each image), deepstack from block 0
    return dict(out, num_position_embeddings=64, deepstack_visual_indexes=[0])


def tiny_qwen_vl_config(spec: QwenVLSpec, tokenizer: PreTrainedTokenizerBase) -> PretrainedConfig:
    """The family's composite config; token ids come from `tokenizer` (see `qwen_tokenizer`)."""
    vocab = tokenizer.get_vocab()
    ids = {name: vocab.get(tok) for name, tok in VISION_TOKENS.items()}
    if None in ids.values():
        raise AlignTIError(f"the tokenizer lacks Qwen-VL's vision tokens {list(VISION_TOKENS.values())}")
    config_cls, _ = _MODELS[spec.family]
    return config_cls(
        text_config=_text_config(spec, tokenizer), vision_config=_vision_config(spec),
        image_token_id=ids["image_token"], video_token_id=ids["video_token"],
        vision_start_token_id=ids["vision_start_token"], vision_end_token_id=ids["vision_end_token"],
        tie_word_embeddings=False,
    )


def build_image_processor(spec: QwenVLSpec, image_mean: list[float] | None = None,
                          image_std: list[float] | None = None) -> Qwen2VLImageProcessorPil:
    """The PIL image processor every Qwen-VL family uses (image_processing_auto.py:146-150)."""
    return Qwen2VLImageProcessorPil(
        min_pixels=spec.min_pixels, max_pixels=spec.max_pixels, patch_size=spec.patch, merge_size=spec.merge,
        temporal_patch_size=2, image_mean=image_mean or [0.5, 0.5, 0.5], image_std=image_std or [0.5, 0.5, 0.5],
    )


def build_tiny_qwen_vl(spec: QwenVLSpec, tokenizer: PreTrainedTokenizerFast
                       ) -> tuple[PreTrainedModel, PreTrainedTokenizerFast, Qwen2VLImageProcessorPil]:
    """Random-weight tiny model (fp32, eval mode), its tokenizer (a Qwen copy of `tokenizer`) and
    its image processor."""
    tok = qwen_tokenizer(tokenizer) if VISION_TOKENS["image_token"] not in tokenizer.get_vocab() else tokenizer
    config = tiny_qwen_vl_config(spec, tok)
    torch.manual_seed(spec.seed)
    model = _MODELS[spec.family][1](config).eval()
    return model, tok, build_image_processor(spec)
