"""Distillation examples: corpus rows tokenised with the student, joined to cached teacher signals.

The cache is keyed by content-hash sample id (image bytes + conversation), never by row order,
so the join re-reads the corpus the cache was built from, encodes each row with the STUDENT's
processor and looks its id up. Every joined sample is then verified against what the teacher
saw: identical unexpanded token ids, and the same response positions and label spans. A
mismatch is an AlignTIError naming the sample, never a silent misalignment of teacher rows.

Position mapping. Cached positions are in the teacher's expanded sequence. A student whose
vision grid differs (n_v_S != n_v_T) has the same text ids, and every position after the image
run is shifted by n_v_S - n_v_T; response rows (KD, TPA) therefore still line up and are checked
after that shift. Rows inside the image run (IVA) cannot be mapped: `check_iva_compatible`
refuses IVA for such a student.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from alignti.data.corpus import (
    IMAGE_TOKEN_MISMATCH, MISSING_IMAGE, TOO_LONG, CorpusRow, Reject, read_corpus, resolve_image_path,
    sample_content_id,
)
from alignti.data.encode import EncodedSample, SampleEncoder
from alignti.distill.memo import ExampleMemo
from alignti.errors import AlignTIError
from alignti.storage.catalog import read_samples_columns
from alignti.storage.reader import CacheReader
from alignti.storage.schema import SampleSignals

READ_BATCH = 512  # samples per cache read while loading the signals


@dataclass(frozen=True)
class DistillExample:
    """One training sample: the student's encoding and the teacher's cached signals.

    `teacher_iva_layer` / `teacher_num_layers`: the cache's IVA layer and the teacher's LM depth
    (None without a cache or without IVA); `iva_target=attention` scales the layer to the
    student's depth when no student layer is given.
    """

    student: EncodedSample  # tokenised with the STUDENT's processor/encoder
    signals: SampleSignals | None  # None for --recipe sft from a corpus (no cache)
    teacher_iva_layer: int | None = None
    teacher_num_layers: int | None = None


def teacher_to_student_positions(positions: np.ndarray, signals: SampleSignals, student: EncodedSample) -> np.ndarray:
    """int64 [n] expanded teacher positions (outside the image run) -> student positions.

    Positions after the image run move by n_v_S - n_v_T; positions before it stay.
    """
    pos = np.asarray(positions, dtype=np.int64)
    if signals.vision_start < 0:
        return pos
    after = pos >= signals.vision_start + signals.n_v
    return pos + after * (student.n_v - signals.n_v)


def _first_difference(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    diff = np.flatnonzero(a[:n] != b[:n])
    return int(diff[0]) if diff.size else n


def _verify_text_ids(where: str, s_ids: np.ndarray, t_ids: np.ndarray) -> None:
    if not np.array_equal(s_ids, t_ids):
        i = _first_difference(s_ids, t_ids)
        got = int(s_ids[i]) if i < len(s_ids) else "end"
        want = int(t_ids[i]) if i < len(t_ids) else "end"
        raise AlignTIError(f"{where}: the student's token ids differ from the cached teacher ids at text token {i} "
                           f"(student {got}, teacher {want}; lengths {len(s_ids)} vs {len(t_ids)}); the student "
                           f"needs the teacher's tokenizer and chat template (or re-extract)")


def verify_alignment(student: EncodedSample, signals: SampleSignals) -> None:
    """AlignTIError naming the sample unless the student's encoding lines up with the cached one."""
    where = f"sample {signals.sample_id} (source {signals.source_id!r})"
    s_ids, t_ids = np.asarray(student.text_ids, np.int64), np.asarray(signals.text_ids, np.int64)
    _verify_text_ids(where, s_ids, t_ids)
    if student.vision_start != signals.vision_start or (student.n_v == 0) != (signals.n_v == 0):
        raise AlignTIError(f"{where}: the image run starts at {student.vision_start} for the student but at "
                           f"{signals.vision_start} in the cache")
    resp = teacher_to_student_positions(signals.resp_positions, signals, student)
    if not np.array_equal(resp, student.resp_positions.numpy()):
        raise AlignTIError(f"{where}: the student's response positions differ from the cached ones "
                           f"({student.resp_positions.numel()} vs {len(resp)} rows); labels would not line up")
    spans = np.asarray(signals.label_spans, np.int64).reshape(-1, 2)
    mapped = np.stack([teacher_to_student_positions(spans[:, 0], signals, student),
                       teacher_to_student_positions(spans[:, 1] - 1, signals, student) + 1], axis=1)
    if not np.array_equal(mapped, np.asarray(student.label_spans, np.int64).reshape(-1, 2)):
        raise AlignTIError(f"{where}: the student's label spans differ from the cached ones")


def _read_signals(reader: CacheReader) -> dict[str, SampleSignals]:
    """Every cached sample by id, read in batches (never row by row)."""
    out: dict[str, SampleSignals] = {}
    for start in range(0, len(reader), READ_BATCH):
        for sig in reader.get_batch(np.arange(start, min(start + READ_BATCH, len(reader)))):
            out[sig.sample_id] = sig
    return out


def _encoder_for_cache(encoder: SampleEncoder, reader: CacheReader) -> SampleEncoder:
    """The encoder itself, or a shallow copy reading images from the cache's recorded image root."""
    if encoder.image_root is not None:
        return encoder
    root = reader.manifest.extra.get("image_root")
    if root is None:
        return encoder  # text-only corpora need no image root; image rows become rejects
    enc = copy.copy(encoder)
    enc.image_root = str(root)
    return enc


def cache_examples(reader: CacheReader, encoder: SampleEncoder,
                   data: str | None) -> tuple[list[DistillExample], list[Reject]]:
    """Join the cache with its corpus, encoded by the student; verified, in corpus order.

    data: the corpus (default: the path extract recorded, manifest extra["data"]); the encoder's
    image root, when None, defaults to the recorded extra["image_root"]. Corpus rows whose source
    id is not in the cache are skipped unread (rows the teacher rejected, or outside --limit).
    Rejects: cached samples the student cannot use (e.g. over the student's --max-length, image
    missing under the image root). A cached sample matched by no corpus row (corpus or images
    changed since extraction, wrong --data) is an AlignTIError: the cache must be used whole.
    """
    path = data or reader.manifest.extra.get("data")
    if not path:
        raise AlignTIError("the cache records no corpus path; pass --data (the corpus it was extracted from)")
    enc = _encoder_for_cache(encoder, reader)
    cached = _read_signals(reader)
    sources = {sig.source_id for sig in cached.values()}
    layer = reader.manifest.settings.iva_layer
    depth = reader.manifest.teacher_fingerprint.get("num_hidden_layers")
    depth = depth if isinstance(depth, int) else None
    examples: list[DistillExample] = []
    rejects: list[Reject] = []
    matched: set[str] = set()
    rejected_sources: set[str] = set()
    for row in read_corpus(path):
        if isinstance(row, Reject) or row.source_id not in sources:
            continue  # never extracted; a cached row that is now malformed shows up as unmatched below
        sample = enc.encode(row)
        if isinstance(sample, Reject):
            rejects.append(sample)
            rejected_sources.add(sample.source_id)
            continue
        sig = cached.get(sample.sample_id)
        if sig is None or sample.sample_id in matched:
            continue  # content not in the cache (changed row), or a duplicate of a joined row
        verify_alignment(sample, sig)
        matched.add(sample.sample_id)
        examples.append(DistillExample(sample, sig, layer, depth))
    missing = [sig for sid, sig in cached.items() if sid not in matched and sig.source_id not in rejected_sources]
    if missing:
        raise AlignTIError(f"{len(missing)} cached sample(s) match no row of corpus {path!r} (e.g. sample "
                           f"{missing[0].sample_id}, source {missing[0].source_id!r}): the corpus or its images "
                           f"changed since extraction, or --data / --image-root point elsewhere")
    return examples, rejects


def corpus_examples(data: str, encoder: SampleEncoder) -> tuple[list[DistillExample], list[Reject]]:
    """Every usable corpus row encoded by the student, without teacher signals (--recipe sft)."""
    examples: list[DistillExample] = []
    rejects: list[Reject] = []
    for row in read_corpus(data):
        sample = row if isinstance(row, Reject) else encoder.encode(row)
        if isinstance(sample, Reject):
            rejects.append(sample)
        else:
            examples.append(DistillExample(sample, None))
    return examples, rejects


def check_iva_compatible(examples: list[DistillExample] | ExampleSet, student_n_v: int) -> None:
    """Call when the IVA weight is > 0: AlignTIError unless IVA can be computed for this student.

    IVA compares teacher and student at the same vision positions (logits target) or over the
    same vision tokens (attention target), so the student's vision-token count per image must
    equal the teacher's; the cache must also hold IVA signals.
    """
    if isinstance(examples, ExampleSet):
        with_iva = examples.iva_samples()
    else:
        with_iva = [(e.signals.sample_id, e.signals.n_v, e.student.n_v) for e in examples
                    if e.signals is not None and e.signals.saliency.size > 0]
    if not with_iva:
        raise AlignTIError("IVA is requested but no sample has IVA signals (a corpus without a cache, a cache "
                           "extracted with --iva-layer none, or no images): set --iva-weight 0 or use --recipe kd")
    for sample_id, teacher_n_v, sample_n_v in with_iva:
        if teacher_n_v != student_n_v or sample_n_v != teacher_n_v:
            raise AlignTIError(
                f"IVA needs the student's vision-token count to equal the teacher's: the cache has n_v={teacher_n_v} "
                f"per image, the student {student_n_v if student_n_v != teacher_n_v else sample_n_v} (sample "
                f"{sample_id}); use --iva-weight 0 (or --recipe kd), or a student with the teacher's "
                f"image size and patch size")


# ---------------------------------------------------------------- lazy examples (what training uses)
#
# `cache_examples` / `corpus_examples` above hold every sample's encoding (pixel values included)
# and signals: ~1.5 MB per LLaVA sample, ~1 TB at 665k. Training needs only the count, the lengths
# and the micro-batch at hand, so `ExampleSet` keeps per sample the corpus row (its text) and a
# few numbers, and encodes + reads signals per micro-batch. Same order, contents and checks as the
# eager join, except what cannot be known without decoding the image or tokenising every row:
# a corrupt image, an image changed since extraction, or a token mismatch beyond the first
# sample raise an AlignTIError naming the sample when that sample is first used.


class ExampleSet(Sequence):
    """Sequence of DistillExample built on demand; `lengths` (expanded student lengths) up front.

    Held per sample: the CorpusRow (its text; the image stays on disk), int64 length, and with a
    cache the int64 cache index, 32-byte sample id, int32 teacher n_v and an IVA flag.
    """

    def __init__(self, encoder: SampleEncoder, rows: list[CorpusRow], lengths: list[int], student_n_v: int,
                 reader: CacheReader | None = None, sample_ids: list[str] | None = None,
                 teacher_n_v: list[int] | None = None, has_iva: list[bool] | None = None,
                 layer: int | None = None, depth: int | None = None) -> None:
        self.encoder, self.rows, self.reader = encoder, rows, reader
        self._lengths = np.asarray(lengths, dtype=np.int64)
        self.student_n_v, self.layer, self.depth = student_n_v, layer, depth
        self._ids = np.array(sample_ids or [], dtype="S")
        self._cache_index = reader.index_of(sample_ids) if reader is not None else np.zeros(0, np.int64)
        self._teacher_n_v = np.asarray(teacher_n_v or [], dtype=np.int32)
        self._has_iva = np.asarray(has_iva or [], dtype=bool)
        self.memo = ExampleMemo(0)  # see keep_in_memory

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def lengths(self) -> list[int]:
        """Expanded student length of every sample (len(text_ids) - n_images + n_images * n_v_S)."""
        return self._lengths.tolist()

    @property
    def has_text_only(self) -> bool:
        """Whether some sample has no image (its micro-batch skips the projector)."""
        return any(not r.image for r in self.rows)

    def iva_samples(self) -> list[tuple[str, int, int]]:
        """(sample id, teacher n_v, student n_v) of every sample with cached IVA signals."""
        return [(self._ids[i].decode(), int(self._teacher_n_v[i]), self.student_n_v if self.rows[i].image else 0)
                for i in np.flatnonzero(self._has_iva)]

    def __getitem__(self, i: int) -> DistillExample:  # type: ignore[override]
        return self.get_many([i])[0]

    def keep_in_memory(self, budget_bytes: int) -> None:
        """Keep built examples (up to `budget_bytes` of tensors) for later epochs."""
        self.memo = ExampleMemo(budget_bytes)

    def get_many(self, indices: Sequence[int]) -> list[DistillExample]:
        """The examples at `indices`: from the memo, or built now (signals in one batched cache read)."""
        idx = [int(i) + len(self) if int(i) < 0 else int(i) for i in indices]
        if any(not 0 <= i < len(self) for i in idx):
            raise IndexError(f"example index out of range for {len(self)} examples")
        missing = sorted({i for i in idx if i not in self.memo})
        built = dict(zip(missing, self._build(missing))) if missing else {}
        for i, ex in built.items():
            self.memo.put(i, ex)
        return [built[i] if i in built else self.memo[i] for i in idx]

    def _build(self, idx: list[int]) -> list[DistillExample]:
        samples = [self._encode(i) for i in idx]
        if self.reader is None:
            return [DistillExample(s, None) for s in samples]
        sigs = self.reader.get_batch(self._cache_index[idx])
        out = []
        for i, s, sig in zip(idx, samples, sigs):
            if s.sample_id != sig.sample_id:
                raise AlignTIError(f"sample {sig.sample_id} (source {sig.source_id!r}): the corpus row or its image "
                                   f"changed since extraction (it now hashes to {s.sample_id}); restore them or "
                                   f"re-extract")
            verify_alignment(s, sig)
            self._check_length(i, s)
            out.append(DistillExample(s, sig, self.layer, self.depth))
        return out

    def _encode(self, i: int) -> EncodedSample:
        row = self.rows[i]
        sample = self.encoder.encode(row)
        if isinstance(sample, Reject):
            raise AlignTIError(f"source {row.source_id!r}: the student cannot use this sample ({sample.reason}: "
                               f"{sample.detail}); only missing images and over-long samples are found at start")
        if self.reader is None:
            self._check_length(i, sample)
        return sample

    def _check_length(self, i: int, sample: EncodedSample) -> None:
        if sample.length != int(self._lengths[i]):
            raise AlignTIError(f"sample {sample.sample_id} (source {sample.source_id!r}): {sample.length} tokens, "
                               f"{int(self._lengths[i])} expected from the start-up index (an image processor whose "
                               f"output size depends on the image is not supported)")


def student_vision_tokens(encoder: SampleEncoder) -> int:
    """n_v per image for the student, from a blank image (fixed-grid processors: any input gives it)."""
    blank = Image.new("RGB", (32, 32))
    pixel_values = encoder.processor.image_processor(images=[blank], return_tensors="pt")["pixel_values"]
    return encoder.num_vision_tokens(pixel_values)


def _image_reject(enc: SampleEncoder, row: CorpusRow) -> Reject | None:
    """The encoder's image checks that need no decode: no image root, path outside it, file missing."""
    if not row.image:
        return None
    if enc.image_root is None:
        return Reject(row.source_id, MISSING_IMAGE, "row has an image but no --image-root was given")
    path = resolve_image_path(enc.image_root, row.image)
    return Reject(row.source_id, path.reason, path.detail) if isinstance(path, Reject) else None


def _expanded_length(n_text: int, n_images: int, n_v: int) -> int:
    return n_text - n_images + n_images * n_v


def _cache_index_columns(reader: CacheReader) -> dict[str, tuple]:
    """sample id -> (source id, image sha256, len(text_ids), teacher n_v, has IVA), read from each part's
    samples.parquet (no signal arrays); a duplicate id keeps its first part, as the reader does."""
    out: dict[str, tuple] = {}
    cols = ["sample_id", "source_id", "image_sha256", "text_ids", "n_v", "sal_count"]
    for part in reader.parts:
        c = read_samples_columns(reader.loc, part, cols)
        for sid, src, sha, ids, n_v, n_sal in zip(*(c[k] for k in cols)):
            out.setdefault(sid, (src, sha, len(ids), int(n_v), int(n_sal) > 0))
    return out


def lazy_cache_examples(reader: CacheReader, encoder: SampleEncoder,
                        data: str | None) -> tuple[ExampleSet, list[Reject]]:
    """`cache_examples` without holding encodings or signals: same order, rejects and start-up errors.

    The join is by source id and content id (cached image sha256 + the row's turns), so a changed
    conversation is found at start; a changed image when the sample is first used.
    """
    path = data or reader.manifest.extra.get("data")
    if not path:
        raise AlignTIError("the cache records no corpus path; pass --data (the corpus it was extracted from)")
    enc = _encoder_for_cache(encoder, reader)
    index = _cache_index_columns(reader)
    by_source: dict[str, set[str]] = {}
    for sid, (src, sha, *_) in index.items():
        by_source.setdefault(src, set()).add(sha)
    n_v_s = student_vision_tokens(enc)
    rows, sids, lengths, rejects = [], [], [], []
    matched: set[str] = set()
    rejected_sources: set[str] = set()
    for row in read_corpus(path):
        if isinstance(row, Reject) or row.source_id not in by_source:
            continue
        bad = _image_reject(enc, row)
        sid = next((s for s in (sample_content_id(sha, row.turns) for sha in sorted(by_source[row.source_id]))
                    if s in index and s not in matched), None)
        length = 0 if sid is None else _expanded_length(index[sid][2], int(bool(index[sid][1])), n_v_s)
        if bad is None and length > enc.max_length:
            bad = Reject(row.source_id, TOO_LONG, f"{length} tokens > max length {enc.max_length}")
        if bad is not None:
            rejects.append(bad)
            rejected_sources.add(row.source_id)
        elif sid is not None:
            matched.add(sid)
            rows.append(row)
            sids.append(sid)
            lengths.append(length)
    missing = [(sid, v[0]) for sid, v in index.items() if sid not in matched and v[0] not in rejected_sources]
    if missing:
        raise AlignTIError(f"{len(missing)} cached sample(s) match no row of corpus {path!r} (e.g. sample "
                           f"{missing[0][0]}, source {missing[0][1]!r}): the corpus or its images "
                           f"changed since extraction, or --data / --image-root point elsewhere")
    depth = reader.manifest.teacher_fingerprint.get("num_hidden_layers")
    out = ExampleSet(enc, rows, lengths, n_v_s, reader, sids, [index[s][3] for s in sids], [index[s][4] for s in sids],
                     reader.manifest.settings.iva_layer, depth if isinstance(depth, int) else None)
    if rows:  # fail fast on a tokenizer / template mismatch: the first sample's text ids (no image)
        first = reader.get_batch(out._cache_index[:1])[0]
        _verify_text_ids(f"sample {first.sample_id} (source {first.source_id!r})", _text_ids(enc, rows[0]),
                         np.asarray(first.text_ids, np.int64))
    return out, rejects


def _text_ids(enc: SampleEncoder, row: CorpusRow) -> np.ndarray:
    """int64 [L] unexpanded ids of a row, as SampleEncoder.encode tokenises it (no image needed)."""
    full, _, _ = enc.char_spans(row.turns)
    return np.asarray(enc.tokenizer(full, add_special_tokens=False)["input_ids"], dtype=np.int64)


def lazy_corpus_examples(data: str, encoder: SampleEncoder) -> tuple[ExampleSet, list[Reject]]:
    """`corpus_examples` without encodings: every row is tokenised once (text only) for its length."""
    n_v_s = student_vision_tokens(encoder)
    rows, lengths, rejects = [], [], []
    for row in read_corpus(data):
        bad = row if isinstance(row, Reject) else _image_reject(encoder, row)
        if bad is None:
            ids = _text_ids(encoder, row)
            n_images = int((ids == encoder.image_token_id).sum())
            length = _expanded_length(len(ids), n_images, n_v_s)
            if n_images != (1 if row.image else 0):
                bad = Reject(row.source_id, IMAGE_TOKEN_MISMATCH, f"{n_images} image tokens after templating")
            elif length > encoder.max_length:
                bad = Reject(row.source_id, TOO_LONG, f"{length} tokens > max length {encoder.max_length}")
        if bad is not None:
            rejects.append(bad)
        else:
            rows.append(row)
            lengths.append(length)
    return ExampleSet(encoder, rows, lengths, n_v_s), rejects
