"""alignti.storage: the teacher-signal cache (format: docs/cache-format.md).

schema      names, dtypes, shapes, SampleSignals / CacheSettings / CacheManifest
writer      CacheWriter: per-worker, crash-safe parts; resume; rejects
reader      CacheReader: validated batched random access (path or fsspec URL)
inspect     InspectConfig / run_inspect (`alignti inspect`), stats: the numbers behind it
encoding    log-prob quantisation; packing: ragged samples <-> flat part arrays
arrays      Zarr v3 writing; shards: direct batched shard decoding
catalog     discovering and validating parts; parts: part.json, sealing, locks; lifecycle: cache.json
files       fsync and the one atomic JSON writer (also used by distill and eval)
validation  checks on samples before writing; synthetic: realistic fake signals for tests/bench
"""
