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
from dataclasses import dataclass

import numpy as np

from alignti.data.corpus import Reject, read_corpus
from alignti.data.encode import EncodedSample, SampleEncoder
from alignti.errors import AlignTIError
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


def verify_alignment(student: EncodedSample, signals: SampleSignals) -> None:
    """AlignTIError naming the sample unless the student's encoding lines up with the cached one."""
    where = f"sample {signals.sample_id} (source {signals.source_id!r})"
    s_ids, t_ids = np.asarray(student.text_ids, np.int64), np.asarray(signals.text_ids, np.int64)
    if not np.array_equal(s_ids, t_ids):
        i = _first_difference(s_ids, t_ids)
        got = int(s_ids[i]) if i < len(s_ids) else "end"
        want = int(t_ids[i]) if i < len(t_ids) else "end"
        raise AlignTIError(f"{where}: the student's token ids differ from the cached teacher ids at text token {i} "
                           f"(student {got}, teacher {want}; lengths {len(s_ids)} vs {len(t_ids)}); the student "
                           f"needs the teacher's tokenizer and chat template (or re-extract)")
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


def check_iva_compatible(examples: list[DistillExample], student_n_v: int) -> None:
    """Call when the IVA weight is > 0: AlignTIError unless IVA can be computed for this student.

    IVA compares teacher and student at the same vision positions (logits target) or over the
    same vision tokens (attention target), so the student's vision-token count per image must
    equal the teacher's; the cache must also hold IVA signals.
    """
    with_iva = [e for e in examples if e.signals is not None and e.signals.saliency.size > 0]
    if not with_iva:
        raise AlignTIError("IVA is requested but no sample has IVA signals (a corpus without a cache, a cache "
                           "extracted with --iva-layer none, or no images): set --iva-weight 0 or use --recipe kd")
    for e in with_iva:
        teacher_n_v = e.signals.n_v
        if teacher_n_v != student_n_v or e.student.n_v != teacher_n_v:
            raise AlignTIError(
                f"IVA needs the student's vision-token count to equal the teacher's: the cache has n_v={teacher_n_v} "
                f"per image, the student {student_n_v if student_n_v != teacher_n_v else e.student.n_v} (sample "
                f"{e.signals.sample_id}); use --iva-weight 0 (or --recipe kd), or a student with the teacher's "
                f"image size and patch size")
