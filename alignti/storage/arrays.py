"""Zarr v3 side of a part: writing the flat signal arrays, reading row selections back.

Every array of a part is one shard file (`signals.zarr/<name>/c/0[/0..]`) holding inner chunks of
about CHUNK_BYTES raw bytes, each Blosc-zstd compressed with byte shuffle and followed by a
CRC32C, so random reads decode only the chunks they touch and a modified byte anywhere in a
chunk is caught when that chunk is read. Reading is in storage/shards.py.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec
from zarr.storage import FsspecStore, LocalStore

from alignti.errors import AlignTIError
from alignti.storage.schema import ARRAYS, LOGPROB_STEP, SCHEMA_VERSION, SIGNALS_ZARR

CHUNK_BYTES = 64 * 1024  # raw bytes per inner chunk: random-read cost vs. compression ratio
BLOSC_LEVEL = 5  # clevel 9 saves ~1% on ids at 2x the write time (bench/cache_size.py)


def chunking(shape: tuple[int, ...], itemsize: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(inner chunk shape, shard shape) for a [rows, ...] array: one shard holds all rows."""
    inner = tuple(max(1, s) for s in shape[1:])
    row_bytes = max(1, math.prod(inner) * itemsize)
    rows = max(1, min(max(shape[0], 1), CHUNK_BYTES // row_bytes))
    shard_rows = max(rows, math.ceil(shape[0] / rows) * rows)
    return (rows,) + inner, (shard_rows,) + inner


def write_signals(part_dir: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write the stored (encoded) flat arrays of one part into `part_dir/signals.zarr`."""
    group = zarr.open_group(LocalStore(part_dir / SIGNALS_ZARR), mode="w-", zarr_format=3,
                            attributes={"alignti_schema_version": SCHEMA_VERSION})
    for spec in ARRAYS:
        data = arrays[spec.name]
        chunks, shards = chunking(data.shape, data.dtype.itemsize)
        attrs: dict[str, Any] = {"encoding": spec.encoding, "group": spec.group}
        if spec.encoding.startswith("logprob"):
            attrs["logprob_step"] = LOGPROB_STEP
        arr = group.create_array(spec.name, shape=data.shape, dtype=data.dtype, chunks=chunks, shards=shards,
                                 compressors=[BloscCodec(cname="zstd", clevel=BLOSC_LEVEL, shuffle="shuffle"),
                                              Crc32cCodec()],
                                 fill_value=0, attributes=attrs)
        if data.size:
            arr[...] = data


def open_store(root: str) -> LocalStore | FsspecStore:
    """A read-only zarr store for the cache root: local path, or any fsspec URL (file://, s3://...)."""
    if "://" in root:
        return FsspecStore.from_url(root, read_only=True)
    return LocalStore(root, read_only=True)


def open_zarr_array(store: LocalStore | FsspecStore, path: str, what: str) -> zarr.Array:
    """Open one array through zarr (fallback read path); AlignTIError naming it if unreadable."""
    try:
        return zarr.open_array(store=store, path=path, mode="r", zarr_format=3)
    except Exception as e:  # zarr raises several types for missing/garbled metadata
        raise AlignTIError(f"{what}: cannot open ({type(e).__name__}: {e})") from None


def shard_file(name: str, ndim: int) -> str:
    """Relative path (inside a part) of the single shard file of array `name`."""
    return f"{SIGNALS_ZARR}/{name}/c/" + "/".join(["0"] * ndim)
