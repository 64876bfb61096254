"""CacheReader: validated, batched random access to a cache (local path or fsspec URL).

At open: cache.json (schema version, encoding), every committed part's part.json (manifest
identity hash) and one listing comparing every file's size with part.json; then the sample_id
and offset columns of each part build the in-memory index (~90 B per sample). Index i is the i-th smallest sample id, so a cache built
in several runs, by any number of workers, indexes (and shuffles) exactly like one built in one
run. Duplicate sample ids across parts (two workers given the same content) keep the first part.

On the first read from a part in this process, its small files (parquet, zarr metadata) are
checked against their sha256; shard files carry a CRC32C per chunk (and per shard index) that is
checked on every decode (storage/shards.py). `verify()` checks every file's sha256.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from alignti.errors import AlignTIError
from alignti.storage.arrays import open_store, open_zarr_array, shard_file
from alignti.storage.catalog import (
    CacheLocation, check_part_sizes, list_parts, read_manifest, read_rejects, read_samples_columns,
    verify_part_checksums,
)
from alignti.storage.packing import decode_array, row_selection, stored_row_shape, unpack
from alignti.storage.parts import PartInfo
from alignti.storage.schema import (
    ARRAYS, GROUPS, PARTS_DIR, SAMPLES_PARQUET, SIGNALS_ZARR, STUDENT_COMPAT_KEYS, CacheManifest, SampleSignals,
)
from alignti.storage.shards import ShardRows, ZarrRows

# Held in memory for every sample (read at open); the rest is read per batch.
_INDEX_INT_COLUMNS = ["n_v", "vision_start"] + [c for pair in GROUPS.values() for c in pair]
_BATCH_COLUMNS = ["source_id", "image_path", "image_sha256", "text_ids", "label_spans"]


def _id_array(ids: list[str]) -> np.ndarray:
    """Sample ids as a sortable numpy array: bytes (1 B/char) when ASCII, as content hashes are."""
    if not ids:
        return np.zeros(0, dtype="S1")
    try:
        return np.array(ids, dtype="S")
    except UnicodeEncodeError:
        return np.array(ids, dtype=str)


def _id_strings(arr: np.ndarray) -> list[str]:
    return [x.decode() for x in arr.tolist()] if arr.dtype.kind == "S" else arr.tolist()


@dataclass
class _PartHandle:
    arrays: dict[str, ShardRows | ZarrRows]
    parquet_meta: pq.FileMetaData
    group_starts: np.ndarray  # int64 [G+1] first row of each parquet row group


class CacheReader:
    """Read side of a cache. Create with `CacheReader.open(path_or_url)`."""

    def __init__(self, loc: CacheLocation, manifest: CacheManifest, parts: list[PartInfo], max_open_parts: int) -> None:
        self.loc, self.manifest, self.parts = loc, manifest, parts
        self._store: Any = None  # zarr store, only for arrays the direct shard reader does not handle
        self._handles: OrderedDict[int, _PartHandle] = OrderedDict()
        self._max_open = max_open_parts
        self._build_index()

    @classmethod
    def open(cls, path_or_url: str, *, max_open_parts: int = 256) -> CacheReader:
        """Open and validate a cache; one-line AlignTIError on any structural problem."""
        loc = CacheLocation.of(str(path_or_url))
        manifest = read_manifest(loc)
        parts = list_parts(loc, manifest.identity_hash())
        check_part_sizes(loc, parts)
        return cls(loc, manifest, parts, max_open_parts)

    def drop_handles(self) -> None:
        """Forget the open part handles, the zarr store and the filesystem instance; they reopen on
        first use. A forked DataLoader worker calls this: file handles and fsspec's event loop must
        not be shared with the parent. The index (read at open) is kept."""
        self.loc = CacheLocation.of(self.loc.url)
        self._handles.clear()
        self._store = None

    def __reduce__(self) -> tuple:
        # DataLoader workers started with spawn re-open (and re-validate) instead of pickling handles.
        return (_reopen, (self.loc.url, self._max_open))

    def _build_index(self) -> None:
        ids: list[str] = []
        part_of, row_of = [], []
        ints: dict[str, list[np.ndarray]] = {c: [] for c in _INDEX_INT_COLUMNS}
        for pi, p in enumerate(self.parts):
            cols = read_samples_columns(self.loc, p, ["sample_id"] + _INDEX_INT_COLUMNS)
            ids.extend(cols["sample_id"])
            part_of.append(np.full(p.num_samples, pi, dtype=np.int32))
            row_of.append(np.arange(p.num_samples, dtype=np.int64))
            for c in _INDEX_INT_COLUMNS:
                ints[c].append(np.asarray(cols[c], dtype=np.int64))
        all_ids = _id_array(ids)
        uniq, first = np.unique(all_ids, return_index=True)  # sorted ids, first occurrence in part order
        self.num_duplicates = len(all_ids) - len(uniq)
        self._ids = uniq

        def cat(arrs: list[np.ndarray], dtype: type) -> np.ndarray:
            return np.concatenate(arrs)[first] if arrs else np.zeros(0, dtype)

        self._part, self._row = cat(part_of, np.int32), cat(row_of, np.int64)
        self._ints = {c: cat(v, np.int64) for c, v in ints.items()}
        self._resp = self._ints["resp_count"]

    # ---- index -------------------------------------------------------------------------------

    def __len__(self) -> int:
        return int(self._ids.shape[0])

    @property
    def sample_ids(self) -> list[str]:
        """All sample ids, ascending (index i <-> sample_ids[i])."""
        return _id_strings(self._ids)

    @property
    def num_response_tokens(self) -> int:
        return int(self._resp.sum())

    def response_counts(self) -> np.ndarray:
        """int64 [len] N_r of every sample, by index (for length-aware batching)."""
        return self._resp.copy()

    def index_of(self, sample_ids: Sequence[str]) -> np.ndarray:
        """int64 indices of `sample_ids`; AlignTIError naming the first unknown id."""
        wanted = list(sample_ids)
        try:
            q = np.array(wanted, dtype=self._ids.dtype.kind) if wanted else self._ids[:0]
        except UnicodeEncodeError:  # a non-ASCII id cannot be in an ASCII index
            raise AlignTIError(f"sample id {next(w for w in wanted if not w.isascii())} is not in the cache "
                               f"{self.loc.url}") from None
        pos = np.searchsorted(self._ids, q)
        ok = np.zeros(len(q), dtype=bool)
        if len(self._ids):
            ok = (pos < len(self._ids)) & (self._ids[np.minimum(pos, len(self._ids) - 1)] == q)
        if not ok.all():
            raise AlignTIError(f"sample id {_id_strings(q[~ok][:1])[0]} is not in the cache {self.loc.url}")
        return pos.astype(np.int64)

    # ---- reads -------------------------------------------------------------------------------

    def get_batch(self, indices: Sequence[int] | np.ndarray) -> list[SampleSignals]:
        """Samples at `indices` (in that order), read part by part: per part one parquet read and
        one ranged read per array (only the chunks the rows fall in)."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"index out of range for a cache of {len(self)} samples")
        out: list[SampleSignals | None] = [None] * idx.size
        parts = self._part[idx]
        for p in np.unique(parts):
            sel = np.nonzero(parts == p)[0]
            uniq, inverse = np.unique(idx[sel], return_inverse=True)
            by_row = np.argsort(self._row[uniq], kind="stable")  # read in row order within the part
            samples = self._read_part(int(p), uniq[by_row])
            placed: list[SampleSignals | None] = [None] * len(uniq)
            for k, sample in zip(by_row, samples):
                placed[k] = sample
            for pos, j in zip(sel, inverse.reshape(-1)):
                out[pos] = placed[j]
        return out  # type: ignore[return-value]

    def iter_batches(self, batch_size: int, shuffle: bool = True, seed: int = 0, start_batch: int = 0,
                     drop_last: bool = False) -> Iterator[list[SampleSignals]]:
        """Batches over the whole cache; the order depends only on (len, seed), so `start_batch`
        resumes a run at the same place."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        order = np.random.default_rng(seed).permutation(len(self)) if shuffle else np.arange(len(self))
        n_batches = len(self) // batch_size if drop_last else -(-len(self) // batch_size)
        for b in range(start_batch, n_batches):
            yield self.get_batch(order[b * batch_size:(b + 1) * batch_size])

    def _handle(self, pi: int) -> _PartHandle:
        h = self._handles.get(pi)
        if h is not None:
            self._handles.move_to_end(pi)
            return h
        part = self.parts[pi]
        verify_part_checksums(self.loc, part, skip_shards=True)
        arrays = {spec.name: self._open_array(part, spec.name) for spec in ARRAYS}
        with self.loc.open(PARTS_DIR, part.name, SAMPLES_PARQUET) as fh:
            meta = pq.ParquetFile(fh).metadata
        sizes = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
        h = _PartHandle(arrays, meta, np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64))
        self._handles[pi] = h
        if len(self._handles) > self._max_open:
            self._handles.popitem(last=False)
        return h

    def _open_array(self, part: PartInfo, name: str) -> ShardRows | ZarrRows:
        spec = next(a for a in ARRAYS if a.name == name)
        rel_meta = f"{SIGNALS_ZARR}/{name}/zarr.json"
        try:
            meta = json.loads(self.loc.fs.cat_file(self.loc.path(PARTS_DIR, part.name, rel_meta)))
        except (FileNotFoundError, ValueError) as e:
            raise AlignTIError(f"part {part.name}: {rel_meta} is missing or invalid ({e})") from None
        want = (part.rows[spec.group],) + stored_row_shape(name, self.manifest.settings)
        attrs = meta.get("attributes", {})
        if tuple(meta.get("shape", ())) != want or meta.get("data_type") != spec.stored_dtype \
                or attrs.get("encoding") != spec.encoding:
            raise AlignTIError(f"part {part.name}: array {name} is {meta.get('data_type')} {meta.get('shape')} "
                               f"({attrs.get('encoding')}), expected {spec.stored_dtype} {list(want)} "
                               f"({spec.encoding})")
        rel = shard_file(name, len(want))
        what = f"part {part.name}: {rel}"
        size = part.files.get(rel, {}).get("size")
        fast = ShardRows.maybe(self.loc.fs, self.loc.path(PARTS_DIR, part.name, rel), size, meta, what)
        if fast is not None:
            return fast
        if self._store is None:
            self._store = open_store(self.loc.url)
        return ZarrRows(open_zarr_array(self._store, f"{PARTS_DIR}/{part.name}/{SIGNALS_ZARR}/{name}", what), what)

    def _read_meta(self, part: PartInfo, h: _PartHandle, rows: np.ndarray) -> dict[str, list]:
        """Per-batch samples.parquet columns of ascending `rows`, reading only their row groups."""
        group_of = np.searchsorted(h.group_starts, rows, side="right") - 1
        groups = np.unique(group_of)
        try:
            with self.loc.open_for_arrow(PARTS_DIR, part.name, SAMPLES_PARQUET) as fh:
                pf = pq.ParquetFile(fh, metadata=h.parquet_meta, pre_buffer=False)
                # use_threads=False: a few small row groups; threads only add contention in loader workers
                table = pf.read_row_groups(groups.tolist(), columns=_BATCH_COLUMNS, use_threads=False)
        except Exception as e:
            raise AlignTIError(f"part {part.name}: {SAMPLES_PARQUET} is unreadable ({type(e).__name__}: {e})") from None
        sizes = h.group_starts[groups + 1] - h.group_starts[groups]
        base = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        table = table.take(base[np.searchsorted(groups, group_of)] + rows - h.group_starts[group_of])
        out: dict[str, list] = {c: table.column(c).to_pylist() for c in ("source_id", "image_path", "image_sha256")}
        for c in ("text_ids", "label_spans"):
            col = table.column(c).combine_chunks() if table.num_rows else pa.array([], pa.list_(pa.int32()))
            offsets = col.offsets.to_numpy()
            values = col.flatten().to_numpy(zero_copy_only=False)
            out[c] = [values[offsets[i] - offsets[0]:offsets[i + 1] - offsets[0]] for i in range(len(col))]
        return out

    def _read_part(self, pi: int, indices: np.ndarray) -> list[SampleSignals]:
        """Samples at global `indices` (all in part `pi`, ascending row order)."""
        part = self.parts[pi]
        h = self._handle(pi)
        meta = self._read_meta(part, h, self._row[indices])
        meta["sample_id"] = _id_strings(self._ids[indices])
        meta.update({c: v[indices] for c, v in self._ints.items()})
        decoded: dict[str, np.ndarray] = {}
        for spec in ARRAYS:
            count_col, start_col = GROUPS[spec.group]
            sel = row_selection(meta[start_col], meta[count_col])
            decoded[spec.name] = decode_array(spec.name, h.arrays[spec.name].read(sel))
        return unpack(meta, decoded)

    # ---- checks and bookkeeping --------------------------------------------------------------

    def check_student(self, fingerprint: dict[str, Any]) -> None:
        """AlignTIError naming the field unless the student's token ids line up with the cache's."""
        teacher = self.manifest.teacher_fingerprint
        for key in STUDENT_COMPAT_KEYS:
            if key not in fingerprint:
                raise ValueError(f"student fingerprint has no {key!r}; cannot check it against the cache")
            if str(fingerprint[key]) != str(teacher[key]):
                raise AlignTIError(f"student {key} ({str(fingerprint[key])[:12]}) differs from the cache teacher's "
                                   f"({str(teacher[key])[:12]}): cached token ids would not line up; use a student "
                                   f"with the teacher's {key} or re-extract")

    def verify(self) -> None:
        """Full sha256 check of every file of every part (reads the whole cache)."""
        for p in self.parts:
            verify_part_checksums(self.loc, p, skip_shards=False)

    def rejects(self) -> list[dict[str, str]]:
        """Rejected rows, one per source id (latest reason), minus ids that later became samples."""
        latest: dict[str, tuple[float, dict[str, str]]] = {}
        for p in self.parts:
            if not p.num_rejects:
                continue
            r = read_rejects(self.loc, p)
            for sid, reason, detail in zip(r["source_id"], r["reason"], r["detail"]):
                if sid not in latest or latest[sid][0] <= p.committed_at:
                    latest[sid] = (p.committed_at, {"source_id": sid, "reason": reason, "detail": detail,
                                                    "part": p.name})
        if not latest:
            return []
        sources: set[str] = set()
        for p in self.parts:
            sources.update(read_samples_columns(self.loc, p, ["source_id"])["source_id"])
        return [v for k, (_, v) in sorted(latest.items()) if k not in sources]


def _reopen(url: str, max_open_parts: int) -> CacheReader:
    return CacheReader.open(url, max_open_parts=max_open_parts)
