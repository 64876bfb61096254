"""The one tokenisation path: a corpus row -> teacher-forced tensors, for extract, distill and eval.

Labels and instruction positions come from character spans of the rendered chat template:
rendering the conversation prefix by prefix tells exactly which characters each turn
contributed, so no template-specific token patterns are hard-coded. The text is tokenised
*unexpanded* (one image token per image, the ids the cache stores), then each image token is
expanded to that image's n_v vision tokens, as the models' processors do. What differs between
model families (how images become tensors, how many vision tokens an image gets) comes from the
model's `Processing` (`data/images.py`, implemented by `alignti.models.family.ModelParts`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from alignti.data.corpus import (
    CORRUPT_IMAGE, IMAGE_PLACEHOLDER, IMAGE_TOKEN_MISMATCH, MISSING_IMAGE, TOO_LONG, CorpusRow, LoadedImage, Reject,
    load_image, resolve_image_path, sample_content_id,
)
from alignti.data.images import ImageInputs, Processing, image_header_size
from alignti.errors import AlignTIError

IGNORE_INDEX = -100


@dataclass(frozen=True)
class EncodedSample:
    """One teacher-forced sample. Positions are in the expanded sequence of length T."""

    sample_id: str
    source_id: str
    image_path: str  # relative to the image root; "" for text-only
    image_sha256: str  # "" for text-only
    text_ids: np.ndarray  # int32 [L] unexpanded ids (image token once per image)
    input_ids: torch.Tensor  # int64 [T]
    labels: torch.Tensor  # int64 [T], IGNORE_INDEX except assistant tokens (aligned, unshifted)
    vision_positions: torch.Tensor  # int64 [n_v * n_images]
    instruction_positions: torch.Tensor  # int64 [n_i] user-turn text tokens
    images: ImageInputs | None  # the image's model inputs (None for text-only)
    n_v: int  # vision tokens of the sample's image (0 for text-only)
    label_spans: np.ndarray  # int32 [S, 2] half-open ranges of labelled tokens
    extra: dict
    image_size: tuple[int, int] | None = None  # the original image's (width, height): boxes are in its pixels

    @property
    def length(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def resp_positions(self) -> torch.Tensor:
        """int64 [N_r] positions t whose next token is a labelled (response) token."""
        return torch.nonzero(self.labels[1:] != IGNORE_INDEX).flatten()

    @property
    def vision_start(self) -> int:
        return int(self.vision_positions[0]) if self.vision_positions.numel() else -1


def _split_image_parts(text: str) -> list[dict]:
    parts: list[dict] = []
    for i, piece in enumerate(text.split(IMAGE_PLACEHOLDER)):
        if i:
            parts.append({"type": "image"})
        if piece:
            parts.append({"type": "text", "text": piece})
    return parts


class SampleEncoder:
    """Encodes corpus rows with one model's processing (tokenizer, chat template, images)."""

    def __init__(self, parts: Processing, image_root: str | None, max_length: int = 2048) -> None:
        self.parts = parts
        self.tokenizer = parts.tokenizer
        self.image_root = image_root
        self.max_length = max_length
        self.template = parts.chat_template or self.tokenizer.chat_template
        if not self.template:
            raise AlignTIError("the model's processor and tokenizer have no chat template")
        self.image_token = parts.image_token
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(self.image_token)
        self.list_content = self._template_takes_parts()

    def _template_takes_parts(self) -> bool:
        """Templates differ: llava-hf ones iterate content parts, LM ones print strings."""
        probe = [{"role": "user", "content": _split_image_parts(f"{IMAGE_PLACEHOLDER}\nzq1")}]
        try:
            out = self.tokenizer.apply_chat_template(probe, chat_template=self.template, tokenize=False)
        except Exception:
            return False
        return "zq1" in out and self.image_token in out and "'type'" not in out

    def render(self, turns: tuple[tuple[str, str], ...], add_generation_prompt: bool = False) -> str:
        messages = [{"role": role, "content": _split_image_parts(text) if self.list_content else text}
                    for role, text in turns]
        return self.tokenizer.apply_chat_template(
            messages, chat_template=self.template, tokenize=False, add_generation_prompt=add_generation_prompt)

    def char_spans(self, turns: tuple[tuple[str, str], ...]) -> tuple[str, list, list]:
        """Rendered text, assistant char spans (content + end-of-turn) and user-content char spans."""
        full = self.render(turns)
        label_spans, instr_spans = [], []
        for i, (role, text) in enumerate(turns):
            before = self.render(turns[:i]) if i else ""
            after = self.render(turns[: i + 1])
            if not full.startswith(after) or not after.startswith(before):
                raise AlignTIError("chat template is not prefix-stable; cannot locate turns")
            if role == "assistant":
                start = len(self.render(turns[:i], add_generation_prompt=True))
                end = len(after.rstrip())
                label_spans.append((start, end))
            elif role == "user":
                cursor = len(before)
                for piece in text.split(IMAGE_PLACEHOLDER):
                    piece = piece.strip()
                    at = after.find(piece, cursor) if piece else -1
                    if at >= 0:
                        instr_spans.append((at, at + len(piece)))
                        cursor = at + len(piece)
        return full, label_spans, instr_spans

    def with_image_root(self, image_root: str | None) -> SampleEncoder:
        """The same encoder reading images from another root (a shallow copy)."""
        enc = copy.copy(self)
        enc.image_root = image_root
        return enc

    def vision_tokens(self, path: Path | None) -> int | Reject:
        """Vision tokens of the image at `path` (0 without one), from its header size only: the
        per-image count of a dynamic-resolution model, or the fixed one (the file is then not opened)."""
        if path is None:
            return 0
        fixed = self.parts.vision_tokens(None)
        if fixed is not None:
            return fixed
        size = image_header_size(path)
        if size is None:
            return Reject("", CORRUPT_IMAGE, f"{path.name}: unreadable image header")
        return int(self.parts.vision_tokens(size))

    def expanded_length(self, n_text: int, n_v: int) -> int:
        """Sequence length once the image token (if n_v > 0) in `n_text` ids becomes its n_v vision tokens."""
        return n_text - 1 + n_v if n_v else n_text

    def image_file(self, row: CorpusRow) -> Path | Reject | None:
        """The row's image file (None for text-only), or why it cannot be read (no decode needed)."""
        if not row.image:
            return None
        if self.image_root is None:
            return Reject(row.source_id, MISSING_IMAGE, "row has an image but no --image-root was given")
        path = resolve_image_path(self.image_root, row.image)
        return Reject(row.source_id, path.reason, path.detail) if isinstance(path, Reject) else path

    def _tokenise(self, row: CorpusRow, offsets: bool) -> tuple[np.ndarray, np.ndarray | None, list, list]:
        """int64 [L] unexpanded ids, int64 [L, 2] [start, end) chars of each (with offsets), assistant and
        user char spans."""
        full, label_chars, instr_chars = self.char_spans(row.turns)
        enc = self.tokenizer(full, add_special_tokens=False, return_offsets_mapping=offsets)
        chars = np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2) if offsets else None
        return np.asarray(enc["input_ids"], dtype=np.int64), chars, label_chars, instr_chars

    def text_ids(self, row: CorpusRow) -> np.ndarray:
        """int64 [L] the row's unexpanded token ids, exactly as `encode` tokenises it (no image needed)."""
        return self._tokenise(row, offsets=False)[0]

    def _token_reject(self, source_id: str, text_ids: np.ndarray, has_image: bool) -> Reject | None:
        n_images = int((text_ids == self.image_token_id).sum())
        if n_images != int(has_image):
            return Reject(source_id, IMAGE_TOKEN_MISMATCH, f"{n_images} image tokens after templating")
        return None

    def check_row(self, row: CorpusRow) -> tuple[int, Reject | None]:
        """(expanded length, None) or (0, Reject): every check `encode` makes, in its order, except those
        that need the decoded image (a corrupt file). Cheap: tokenises the text, never opens the image."""
        image = self.image_file(row)
        if isinstance(image, Reject):
            return 0, image
        text_ids = self.text_ids(row)
        bad = self._token_reject(row.source_id, text_ids, bool(row.image))
        if bad is not None:
            return 0, bad
        n_v = self.vision_tokens(image)
        if isinstance(n_v, Reject):
            return 0, Reject(row.source_id, n_v.reason, n_v.detail)
        length = self.expanded_length(len(text_ids), n_v)
        if length > self.max_length:
            return 0, Reject(row.source_id, TOO_LONG, f"{length} tokens > max length {self.max_length}")
        return length, None

    def encode(self, row: CorpusRow) -> EncodedSample | Reject:
        """Row -> EncodedSample, or a Reject naming why it cannot be used."""
        path = self.image_file(row)
        if isinstance(path, Reject):
            return path
        image = None if path is None else load_image(path)
        if isinstance(image, Reject):
            return Reject(row.source_id, image.reason, image.detail)
        text_ids, chars, label_chars, instr_chars = self._tokenise(row, offsets=True)
        bad = self._token_reject(row.source_id, text_ids, bool(row.image))
        if bad is not None:
            return bad
        sample = self._expand(row, image, text_ids, chars, label_chars, instr_chars)
        if sample.length > self.max_length:
            return Reject(row.source_id, TOO_LONG, f"{sample.length} tokens > max length {self.max_length}")
        return sample

    def encode_prompt(self, source_id: str, user_text: str, image: Image.Image | None) -> EncodedSample:
        """One user turn rendered up to the assistant's first token (generation), tokenised and
        expanded exactly as training's samples are; no labels. `user_text` holds `<image>` if `image`."""
        turns = (("user", user_text),)
        prompt = self.render(turns, add_generation_prompt=True)
        enc = self.tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)
        text_ids = np.asarray(enc["input_ids"], dtype=np.int64)
        row = CorpusRow(source_id, None, turns)
        bad = self._token_reject(source_id, text_ids, image is not None)
        if bad is not None:
            raise AlignTIError(f"question {source_id!r}: {bad.detail} (the prompt needs one image token per image)")
        loaded = None if image is None else LoadedImage(image.convert("RGB"), "")
        return self._expand(row, loaded, text_ids, np.asarray(enc["offset_mapping"], np.int64).reshape(-1, 2), [], [])

    def _expand(self, row: CorpusRow, image: LoadedImage | None, text_ids: np.ndarray, chars: np.ndarray,
                label_chars: list, instr_chars: list) -> EncodedSample:
        images = None if image is None else self.parts.encode_images([image.image])
        n_v = 0 if images is None else images.n_v[0]
        starts, ends = chars[:, 0], chars[:, 1]
        # Labels: tokens starting inside an assistant span (its content and end-of-turn token).
        in_label = np.zeros(len(text_ids), bool)
        for s, e in label_chars:
            in_label |= (starts >= s) & (starts < e)
        # Instruction: tokens overlapping the user text, so a first word whose token carries a leading
        # space (' is') counts; a token of whitespace alone outside the stripped text (the newline
        # after <image>) does not.
        in_instr = np.zeros(len(text_ids), bool)
        for s, e in instr_chars:
            in_instr |= (starts < e) & (ends > s)
        is_image = text_ids == self.image_token_id
        in_instr &= ~is_image
        # Each unexpanded token becomes 1 position, or n_v positions for an image token.
        widths = np.where(is_image, n_v, 1)
        new_pos = np.concatenate([[0], np.cumsum(widths)[:-1]])
        input_ids = np.repeat(text_ids, widths)
        labels = np.where(np.repeat(in_label, widths), input_ids, IGNORE_INDEX)
        vision = np.concatenate([np.arange(p, p + n_v) for p in new_pos[is_image]] or [np.zeros(0, np.int64)])
        label_spans = _runs(labels != IGNORE_INDEX)
        return EncodedSample(
            sample_id=sample_content_id(image.sha256 if image else "", row.turns),
            source_id=row.source_id, image_path=row.image or "", image_sha256=image.sha256 if image else "",
            text_ids=text_ids.astype(np.int32), input_ids=torch.from_numpy(input_ids),
            labels=torch.from_numpy(labels), vision_positions=torch.from_numpy(vision.astype(np.int64)),
            instruction_positions=torch.from_numpy(new_pos[in_instr].astype(np.int64)),
            images=images, n_v=n_v, label_spans=label_spans, extra=row.extra,
            image_size=image.image.size if image else None,
        )


def _runs(mask: np.ndarray) -> np.ndarray:
    """int32 [S, 2] half-open [start, end) runs of True in a 1-D boolean mask."""
    padded = np.concatenate([[False], mask, [False]]).astype(np.int8)
    edges = np.flatnonzero(np.diff(padded))
    return edges.reshape(-1, 2).astype(np.int32)
