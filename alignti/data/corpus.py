"""Read LLaVA / MobileVLM corpora (JSON list or JSONL) into validated rows or rejects.

A row is `{"id", "image"?, "conversations": [{"from": "human"|"gpt", "value"}...]}` with
`<image>` in the first human turn. Bad rows never raise: they become a `Reject` with a short
machine-readable reason, so a long extraction run continues and reports what it skipped.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from alignti.errors import AlignTIError

IMAGE_PLACEHOLDER = "<image>"

# Reject reasons (machine-readable; they end up in the cache's rejects table).
MALFORMED_ROW = "malformed_row"
MISSING_IMAGE = "missing_image"
CORRUPT_IMAGE = "corrupt_image"
PATH_OUTSIDE_ROOT = "path_outside_root"
NO_ASSISTANT_TURN = "no_assistant_turn"
IMAGE_TOKEN_MISMATCH = "image_token_mismatch"
TOO_LONG = "too_long"
REJECT_REASONS = (MALFORMED_ROW, MISSING_IMAGE, CORRUPT_IMAGE, PATH_OUTSIDE_ROOT, NO_ASSISTANT_TURN,
                  IMAGE_TOKEN_MISMATCH, TOO_LONG)

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


@dataclass(frozen=True)
class Reject:
    """A corpus row that was skipped, and why."""

    source_id: str
    reason: str
    detail: str = ""


@dataclass(frozen=True)
class CorpusRow:
    """One validated corpus row. `turns` are (role, text) with role in user/assistant/system."""

    source_id: str
    image: str | None
    turns: tuple[tuple[str, str], ...]
    extra: dict = field(default_factory=dict, compare=False)


def parse_row(obj: object, fallback_id: str) -> CorpusRow | Reject:
    """Validate one decoded JSON object; structural problems give a Reject, never an exception."""
    if not isinstance(obj, dict):
        return Reject(fallback_id, MALFORMED_ROW, "row is not an object")
    source_id = str(obj.get("id", fallback_id))
    convs = obj.get("conversations")
    if not isinstance(convs, list) or not convs:
        return Reject(source_id, MALFORMED_ROW, "missing or empty 'conversations'")
    turns = []
    for turn in convs:
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str) or turn.get("from") not in ROLES:
            return Reject(source_id, MALFORMED_ROW, "turn needs 'from' (human|gpt|system) and string 'value'")
        turns.append((ROLES[turn["from"]], turn["value"]))
    image = obj.get("image")
    if image is not None and (not isinstance(image, str) or not image):
        return Reject(source_id, MALFORMED_ROW, "'image' must be one non-empty path string")
    if not any(role == "assistant" for role, _ in turns):
        return Reject(source_id, NO_ASSISTANT_TURN, "no gpt/assistant turn")
    n_placeholders = sum(text.count(IMAGE_PLACEHOLDER) for _, text in turns)
    if n_placeholders != (1 if image else 0):
        return Reject(source_id, IMAGE_TOKEN_MISMATCH, f"{n_placeholders} <image> tags for {1 if image else 0} images")
    extra = {k: v for k, v in obj.items() if k not in ("id", "image", "conversations")}
    return CorpusRow(source_id=source_id, image=image, turns=tuple(turns), extra=extra)


def _head(p: Path) -> bytes:
    with p.open("rb") as fh:
        return fh.read(64).lstrip()


def check_corpus(path: str | Path, option: str = "--data") -> Path:
    """`path` as a Path if it is a readable file that starts like a JSON list or JSONL; else an
    AlignTIError. Cheap (reads a few bytes): commands call it before any work or write."""
    p = Path(path)
    if not p.is_file():
        raise AlignTIError(f"{option}: corpus file {str(p)!r} {'is not a file' if p.exists() else 'does not exist'}")
    try:
        head = _head(p)
    except OSError as e:
        raise AlignTIError(f"{option}: cannot read corpus file {str(p)!r}: {e.strerror}") from None
    if head and head[:1] not in (b"[", b"{"):
        raise AlignTIError(f"{option}: {str(p)!r} is not a LLaVA JSON or JSONL corpus (it starts with {head[:12]!r})")
    return p


def read_corpus(path: str | Path) -> Iterator[CorpusRow | Reject]:
    """Stream rows from a JSON list or a JSONL file; a malformed JSONL line is a Reject."""
    p = check_corpus(path)
    if _head(p).startswith(b"["):
        try:
            items = json.loads(p.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise AlignTIError(f"corpus {str(p)!r} is not valid UTF-8 JSON: {exc}") from None
        for i, obj in enumerate(items):
            yield parse_row(obj, f"row-{i}")
        return
    with p.open("rb") as fh:
        for i, raw in enumerate(fh):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw.decode("utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError):
                yield Reject(f"line-{i + 1}", MALFORMED_ROW, "line is not valid UTF-8 JSON")
                continue
            yield parse_row(obj, f"line-{i + 1}")


def check_image_root(path: str | Path, option: str = "--image-root") -> Path:
    """`path` as a Path if it is a directory; else an AlignTIError (every image would be missing)."""
    p = Path(path)
    if not p.is_dir():
        raise AlignTIError(f"{option} {str(p)!r} {'is not a directory' if p.exists() else 'does not exist'}")
    return p


def resolve_image_path(image_root: str | Path, rel: str) -> Path | Reject:
    """`rel` resolved under `image_root`; anything escaping the root (.., absolute, symlink) is rejected."""
    root = Path(image_root).resolve()
    try:  # a NUL byte (ValueError) or an over-long name (OSError) is a bad path like any other
        candidate = (root / rel).resolve()
        if candidate != root and root not in candidate.parents:
            return Reject("", PATH_OUTSIDE_ROOT, f"{rel!r} resolves outside the image root")
        if not candidate.is_file():
            return Reject("", MISSING_IMAGE, f"{rel!r} not found")
    except (ValueError, OSError) as e:
        return Reject("", MISSING_IMAGE, f"{rel!r} is not a usable path ({e.strerror if isinstance(e, OSError) else e})")
    return candidate


@dataclass(frozen=True)
class LoadedImage:
    image: Image.Image
    sha256: str


def load_image(path: Path) -> LoadedImage | Reject:
    """Decode fully (truncated files fail here, not later) and hash the file bytes."""
    try:
        data = path.read_bytes()
    except OSError as e:  # unreadable (permissions, I/O error)
        return Reject("", MISSING_IMAGE, f"{path.name}: cannot read ({e.strerror})")
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            image = im.convert("RGB")
    except Exception as exc:  # PIL raises many types for corrupt files
        return Reject("", CORRUPT_IMAGE, f"{path.name}: {type(exc).__name__}")
    return LoadedImage(image=image, sha256=hashlib.sha256(data).hexdigest())


def sample_content_id(image_sha256: str, turns: tuple[tuple[str, str], ...]) -> str:
    """Content hash of a sample (image bytes + conversation): order- and run-independent."""
    payload = json.dumps({"image": image_sha256, "turns": [list(t) for t in turns]}, sort_keys=True,
                         ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:32]

