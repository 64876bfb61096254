"""Distillation examples: corpus rows encoded by the student, joined to the cached teacher signals.

The cache is keyed by content-hash sample id (image bytes + conversation), never by row order, so
the join re-reads the corpus the cache was built from and looks each row up. At start only what
needs no image and no tokenisation is read: each part's samples.parquet (ids, text lengths, n_v)
and the corpus rows. An `ExampleSet` keeps per sample the corpus row (its text; the image stays on
disk) and a few numbers; examples are encoded with the STUDENT's processor (`data/encode.py`,
the one tokenisation path) and their signals read in one batched cache read when the loader
builds them (`distill/loader.py`: a window of upcoming micro-batches at a time). Every joined
sample is then verified against what the teacher saw: identical unexpanded token ids, the same
response positions and label spans. A mismatch is an AlignTIError naming the sample, never a
silent misalignment of teacher rows.

What cannot be known without decoding an image (a corrupt file, an image changed since
extraction: its content hash no longer matches) is found when the sample is first built: it is
dropped from that micro-batch and reported with the sample named (`ExampleSet.late_rejects`).

Position mapping. Cached positions are in the teacher's expanded sequence. A student whose vision
grid differs (n_v_S != n_v_T for a sample: another fixed grid, or other resolution settings of a
dynamic-resolution processor) has the same text ids, and every position after the image run is
shifted by n_v_S - n_v_T; response rows (KD, TPA) therefore still line up and are checked after
that shift. Rows inside the image run (IVA) cannot be mapped: `check_iva_compatible` refuses IVA
for such a student, naming the first sample whose counts differ. The student's n_v of every
sample is known at start from the image file's header size alone (`SampleEncoder.vision_tokens`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from alignti.data.corpus import TOO_LONG, CorpusRow, Reject, read_corpus, sample_content_id
from alignti.data.encode import EncodedSample, SampleEncoder
from alignti.distill.memo import ExampleMemo
from alignti.errors import AlignTIError
from alignti.storage.catalog import read_samples_columns
from alignti.storage.reader import CacheReader
from alignti.storage.schema import SampleSignals

CHANGED_SINCE_EXTRACTION = "changed_since_extraction"  # a late reject: the image no longer hashes to its id


@dataclass(frozen=True)
class DistillExample:
    """One training sample: the student's encoding and the teacher's cached signals."""

    student: EncodedSample  # tokenised with the STUDENT's processor/encoder
    signals: SampleSignals | None  # None for --recipe sft from a corpus (no cache)


def teacher_to_student_positions(positions: np.ndarray, signals: SampleSignals, student: EncodedSample) -> np.ndarray:
    """int64 [n] expanded teacher positions (outside the image run) -> student positions.

    Positions after the image run move by n_v_S - n_v_T; positions before it stay.
    """
    pos = np.asarray(positions, dtype=np.int64)
    if signals.vision_start < 0:
        return pos
    after = pos >= signals.vision_start + signals.n_v
    return pos + after * (student.n_v - signals.n_v)


def _where(signals: SampleSignals) -> str:
    return f"sample {signals.sample_id} (source {signals.source_id!r})"


def _verify_text_ids(where: str, s_ids: np.ndarray, t_ids: np.ndarray) -> None:
    if not np.array_equal(s_ids, t_ids):
        n = min(len(s_ids), len(t_ids))
        diff = np.flatnonzero(s_ids[:n] != t_ids[:n])
        i = int(diff[0]) if diff.size else n
        got = int(s_ids[i]) if i < len(s_ids) else "end"
        want = int(t_ids[i]) if i < len(t_ids) else "end"
        raise AlignTIError(f"{where}: the student's token ids differ from the cached teacher ids at text token {i} "
                           f"(student {got}, teacher {want}; lengths {len(s_ids)} vs {len(t_ids)}); the student "
                           f"needs the teacher's tokenizer and chat template (or re-extract)")


def verify_alignment(student: EncodedSample, signals: SampleSignals) -> None:
    """AlignTIError naming the sample unless the student's encoding lines up with the cached one."""
    where = _where(signals)
    _verify_text_ids(where, np.asarray(student.text_ids, np.int64), np.asarray(signals.text_ids, np.int64))
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


class ExampleSet(Sequence):
    """Sequence of DistillExample built on demand; `lengths` (expanded student lengths) known up front.

    Held per sample: the CorpusRow, its int64 length, and with a cache the int64 cache index and the
    32-byte sample id, int32 teacher and student n_v and an IVA flag of its cached signals.
    """

    def __init__(self, encoder: SampleEncoder, rows: list[CorpusRow], lengths: list[int],
                 reader: CacheReader | None = None, sample_ids: list[str] | None = None,
                 teacher_n_v: list[int] | None = None, student_n_v: list[int] | None = None,
                 has_iva: list[bool] | None = None) -> None:
        self.encoder, self.rows, self.reader = encoder, rows, reader
        self._lengths = np.asarray(lengths, dtype=np.int64)
        self._ids = np.array(sample_ids or [], dtype="S")
        self._cache_index = reader.index_of(sample_ids) if reader is not None else np.zeros(0, np.int64)
        self._teacher_n_v = np.asarray(teacher_n_v or [], dtype=np.int32)
        self._student_n_v = np.asarray(student_n_v or [], dtype=np.int32)
        self._has_iva = np.asarray(has_iva or [], dtype=bool)
        self.memo = ExampleMemo(0)  # see keep_in_memory
        self.late_rejects: dict[int, Reject] = {}  # index -> why it could not be built (found when first used)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def lengths(self) -> list[int]:
        """Expanded student length of every sample."""
        return self._lengths.tolist()

    @property
    def has_text_only(self) -> bool:
        """Whether some sample has no image (its micro-batch skips the projector)."""
        return any(not r.image for r in self.rows)

    def iva_samples(self) -> list[tuple[str, str, int, int]]:
        """(sample id, source id, teacher n_v, student n_v) of every sample with cached IVA signals."""
        return [(self._ids[i].decode(), self.rows[i].source_id, int(self._teacher_n_v[i]), int(self._student_n_v[i]))
                for i in np.flatnonzero(self._has_iva)]

    def __getitem__(self, i: int) -> DistillExample:  # type: ignore[override]
        return self.get_many([i])[0]

    def keep_in_memory(self, budget_bytes: int) -> None:
        """Keep built examples (up to `budget_bytes` of tensors) for later epochs."""
        self.memo = ExampleMemo(budget_bytes)

    def get_many(self, indices: Sequence[int]) -> list[DistillExample]:
        """The usable examples at `indices`, in order (see `fetch`)."""
        idx = self._checked(indices)
        found = self.fetch(idx)
        return [found[i] for i in idx if i in found]

    def fetch(self, indices: Sequence[int]) -> dict[int, DistillExample]:
        """index -> example for the usable ones among `indices`: from the memo, or built now, all of
        them with their signals in one batched cache read (one read per cache part they fall in). A
        sample that cannot be built is left out and recorded in `late_rejects`."""
        idx = self._checked(indices)
        missing = sorted({i for i in idx if i not in self.memo and i not in self.late_rejects})
        built = self._build(missing) if missing else {}
        for i, ex in built.items():
            self.memo.put(i, ex)
        return {i: built[i] if i in built else self.memo[i] for i in idx if i not in self.late_rejects}

    def in_worker(self) -> None:
        """Prepare this copy for a DataLoader worker process: no example memory (the main process keeps
        it) and the cache reader's own file handles (never the parent's)."""
        self.memo = ExampleMemo(0)
        if self.reader is not None:
            self.reader.drop_handles()

    def _checked(self, indices: Sequence[int]) -> list[int]:
        idx = [int(i) + len(self) if int(i) < 0 else int(i) for i in indices]
        if any(not 0 <= i < len(self) for i in idx):
            raise IndexError(f"example index out of range for {len(self)} examples")
        return idx

    def first_usable(self) -> DistillExample:
        """The first example that can be built: a stand-in for a micro-batch none of whose samples could."""
        for i in range(len(self)):
            found = self.get_many([i])
            if found:
                return found[0]
        raise AlignTIError(f"none of the {len(self)} samples can be built (e.g. {next(iter(self.late_rejects.values()))})")

    def _build(self, idx: list[int]) -> dict[int, DistillExample]:
        samples = {}
        for i in idx:
            sample = self.encoder.encode(self.rows[i])
            if isinstance(sample, Reject):
                self.late_rejects[i] = sample
            else:
                samples[i] = sample
        if self.reader is None:
            return {i: DistillExample(s, None) for i, s in samples.items()}
        sigs = self.reader.get_batch(self._cache_index[list(samples)])
        out = {}
        for (i, s), sig in zip(samples.items(), sigs):
            if s.sample_id != sig.sample_id:
                self.late_rejects[i] = Reject(sig.source_id, CHANGED_SINCE_EXTRACTION,
                                              f"{_where(sig)} now hashes to {s.sample_id}: its image changed "
                                              f"since extraction")
                continue
            verify_alignment(s, sig)
            out[i] = DistillExample(s, sig)
        return out


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


def cache_examples(reader: CacheReader, encoder: SampleEncoder,
                   data: str | None) -> tuple[ExampleSet, list[Reject]]:
    """The cached samples joined with their corpus rows, in corpus order, and the rows the student cannot use.

    data: the corpus (default: the path extract recorded, manifest extra["data"]); an encoder without an
    image root reads images from the recorded extra["image_root"]. Corpus rows whose source id is not in
    the cache are skipped unread (rows the teacher rejected, or outside --limit). The join is by source id
    and content id (cached image sha256 + the row's turns), so a changed conversation is found here, a
    changed image when the sample is first used. Rejects: cached samples the student cannot use (over
    its --max-length, image missing under the image root). A cached sample matched by no corpus row
    (corpus changed since extraction, wrong --data) is an AlignTIError: the cache must be used whole.
    """
    path = data or reader.manifest.extra.get("data")
    if not path:
        raise AlignTIError("the cache records no corpus path; pass --data (the corpus it was extracted from)")
    if encoder.image_root is None:
        encoder = encoder.with_image_root(reader.manifest.extra.get("image_root"))
    index = _cache_index_columns(reader)
    by_source: dict[str, set[str]] = {}
    for sid, (src, sha, *_) in index.items():
        by_source.setdefault(src, set()).add(sha)
    rows, sids, lengths, n_vs, rejects = [], [], [], [], []
    matched: set[str] = set()
    rejected_sources: set[str] = set()
    for row in read_corpus(path):
        if isinstance(row, Reject) or row.source_id not in by_source:
            continue
        image = encoder.image_file(row)
        n_v = image if isinstance(image, Reject) else encoder.vision_tokens(image)
        bad = Reject(row.source_id, n_v.reason, n_v.detail) if isinstance(n_v, Reject) else None
        sid = next((s for s in (sample_content_id(sha, row.turns) for sha in sorted(by_source[row.source_id]))
                    if s in index and s not in matched), None)
        length = 0 if sid is None or bad is not None else encoder.expanded_length(index[sid][2], n_v)
        if bad is None and length > encoder.max_length:
            bad = Reject(row.source_id, TOO_LONG, f"{length} tokens > max length {encoder.max_length}")
        if bad is not None:
            rejects.append(bad)
            rejected_sources.add(row.source_id)
        elif sid is not None:
            matched.add(sid)
            rows.append(row)
            sids.append(sid)
            lengths.append(length)
            n_vs.append(n_v)
    missing = [(sid, v[0]) for sid, v in index.items() if sid not in matched and v[0] not in rejected_sources]
    if missing:
        raise AlignTIError(f"{len(missing)} cached sample(s) match no row of corpus {path!r} (e.g. sample "
                           f"{missing[0][0]}, source {missing[0][1]!r}): the corpus or its images "
                           f"changed since extraction, or --data / --image-root point elsewhere")
    out = ExampleSet(encoder, rows, lengths, reader, sids, [index[s][3] for s in sids], n_vs,
                     [index[s][4] for s in sids])
    if rows:  # fail fast on a tokenizer / template mismatch: the first sample's text ids (no image)
        first = reader.get_batch(out._cache_index[:1])[0]
        _verify_text_ids(_where(first), encoder.text_ids(rows[0]), np.asarray(first.text_ids, np.int64))
    return out, rejects


def corpus_examples(data: str, encoder: SampleEncoder) -> tuple[ExampleSet, list[Reject]]:
    """Every usable corpus row, without teacher signals (--recipe sft); each row is tokenised once
    (text only, no image decode) for its length and checks."""
    rows, lengths, rejects = [], [], []
    for row in read_corpus(data):
        length, bad = (0, row) if isinstance(row, Reject) else encoder.check_row(row)
        if bad is not None:
            rejects.append(bad)
        else:
            rows.append(row)
            lengths.append(length)
    return ExampleSet(encoder, rows, lengths), rejects


def check_iva_compatible(examples: ExampleSet) -> None:
    """Call when the IVA weight is > 0: AlignTIError unless IVA can be computed for this student.

    IVA compares teacher and student at the same vision positions (logits target) or over the same
    vision tokens (attention target), so the student's vision-token count of every sample's image
    must equal the teacher's; the cache must also hold IVA signals.
    """
    with_iva = examples.iva_samples()
    if not with_iva:
        raise AlignTIError("IVA is requested but no sample has IVA signals (a corpus without a cache, a cache "
                           "extracted with --iva-layer none, or no images): set --iva-weight 0 or use --recipe kd")
    for sample_id, source_id, teacher_n_v, student_n_v in with_iva:
        if teacher_n_v != student_n_v:
            raise AlignTIError(
                f"IVA needs the student's vision-token count to equal the teacher's: sample {sample_id} (source "
                f"{source_id!r}) has n_v={teacher_n_v} in the cache, the student gives its image {student_n_v}; use "
                f"--iva-weight 0 (or --recipe kd), or a student with the teacher's image processor settings "
                f"(image size and patch size; Qwen-VL: patch, merge, min_pixels, max_pixels)")
