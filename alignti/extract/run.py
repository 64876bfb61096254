"""`alignti extract`: run the teacher once over a corpus and write every Align-TI signal.

Reads top to bottom as the whole run: load the teacher, resolve the IVA layer (IRS), open
the cache for this worker, stream + encode + length-group the corpus, run each batch through
the teacher (`HfTeacher` or `VllmTeacher`), write parts, print a summary.
"""

from __future__ import annotations

import gc
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedModel

from alignti.cliargs import write_run_file
from alignti.data.batching import Batch, collate, length_grouped
from alignti.data.corpus import Reject, check_corpus, check_image_root, read_corpus
from alignti.data.encode import EncodedSample, SampleEncoder
from alignti.errors import AlignTIError
from alignti.extract.irs import calibration_samples, check_calibration, compute_irs
from alignti.extract.irs_score import choose_layer
from alignti.extract.teacher import HfTeacher
from alignti.extract.config import ExtractConfig, parse_worker
from alignti.extract.vllm_backend import VllmEngine, VllmTeacher  # vllm itself: lazy
from alignti.models.fingerprint import fingerprint_model_dir
from alignti.models.family import ModelParts, load_parts
from alignti.models.loading import load_config, load_model, resolve_device, resolve_dtype
from alignti.progress import progress_bar
from alignti.storage.lifecycle import check_can_open, load_existing, local_root
from alignti.storage.schema import RUN_YAML, CacheManifest, CacheSettings
from alignti.storage.writer import CacheWriter, resolve_worker


def resolve_iva_layer(cfg: ExtractConfig, num_layers: int, irs_model: Callable[[], PreTrainedModel],
                      encoder: SampleEncoder, pad_id: int) -> tuple[int | None, list | None]:
    """The IVA layer and IRS scores: explicit, none, reused from the cache being resumed, or IRS
    (`irs_model()` gives the full transformers teacher; only called when IRS runs)."""
    if cfg.iva_layer == "none":
        return None, None
    if cfg.iva_layer != "auto":
        layer = int(cfg.iva_layer)
        if not 0 <= layer < num_layers:
            raise AlignTIError(f"--iva-layer {layer} is outside the teacher's LM layers 0..{num_layers - 1}")
        return layer, None
    existing = load_existing(local_root(cfg.out)) if cfg.resume and Path(cfg.out).exists() else None
    if existing is not None and existing.settings.iva_layer is not None:
        return existing.settings.iva_layer, existing.settings.irs_scores
    hint = "--iva-layer auto: pass --iva-layer N or none"
    samples = calibration_samples(encoder, cfg.data, cfg.irs_samples, hint)
    check_calibration(samples, hint)
    scores = compute_irs(irs_model(), samples, pad_id, cfg.batch_size, progress=True)
    return choose_layer(scores), scores.tolist()  # full precision: JSON floats round-trip


def vllm_teacher(cfg: ExtractConfig, settings: CacheSettings, device: str, dtype: torch.dtype,
                 image_token_id: int) -> Callable:
    """vLLM engine for the log-probs (started first: it claims its share of GPU memory) plus the HF
    teacher cut after the IVA layer for saliency."""
    gc.collect()  # a full HF teacher loaded for IRS must be gone before vLLM sizes its memory
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    n = max(settings.top_k, settings.iva_top_k, settings.tpa_top_k)
    engine = VllmEngine.create(cfg.teacher, n, cfg.dtype, cfg.max_length, cfg.vllm_gpu_memory)
    cut = None
    if settings.iva_layer is not None:
        cut = load_model(cfg.teacher, device, dtype, text_layers=settings.iva_layer + 1)
    return VllmTeacher(engine, settings, cfg.image_root, image_token_id, cut)


def worker_rows(data: str, worker: int, num_workers: int, limit: int | None) -> Iterator:
    """Corpus rows of this worker: row i goes to worker i % n (stable for a given corpus)."""
    for i, row in enumerate(read_corpus(data)):
        if limit is not None and i >= limit:
            return
        if i % num_workers == worker:
            yield row


@dataclass
class Teacher:
    """The loaded teacher and what extraction derives from it (`run_extract` and its dry run)."""

    model: PreTrainedModel | None  # the HF teacher; None with --backend vllm (loaded by signal_backend)
    parts: ModelParts
    encoder: SampleEncoder
    settings: CacheSettings
    manifest: CacheManifest
    device: str
    dtype: torch.dtype
    image_token_id: int

    @property
    def pad_id(self) -> int:
        return self.parts.tokenizer.pad_token_id


def load_teacher(cfg: ExtractConfig) -> Teacher:
    """Load the teacher and its parts, resolve the IVA layer (IRS), fix the cache settings."""
    check_corpus(cfg.data)  # the inputs first: a bad path is one line before the teacher loads or IRS runs
    check_image_root(cfg.image_root)
    teacher_config = load_config(cfg.teacher)
    vocab = teacher_config.get_text_config().vocab_size
    for name in ("top_k", "tpa_top_k", "iva_top_k"):
        if getattr(cfg, name) > vocab:
            raise AlignTIError(f"--{name.replace('_', '-')} {getattr(cfg, name)} exceeds the teacher's vocabulary "
                               f"({vocab} tokens)")
    device = resolve_device(cfg.device)
    if device == "cuda" and "LOCAL_RANK" in os.environ:
        device = f"cuda:{os.environ['LOCAL_RANK']}"
    dtype = resolve_dtype(cfg.dtype, device)
    # The vLLM backend loads the full HF teacher only for IRS (then frees it).
    model = load_model(cfg.teacher, device, dtype) if cfg.backend == "hf" else None
    parts = load_parts(cfg.teacher)
    encoder = SampleEncoder(parts, cfg.image_root, cfg.max_length)
    iva_layer, irs = resolve_iva_layer(cfg, teacher_config.get_text_config().num_hidden_layers,
                                       lambda: model or load_model(cfg.teacher, device, dtype), encoder,
                                       parts.tokenizer.pad_token_id)
    settings = CacheSettings(top_k=cfg.top_k, tpa_d=cfg.tpa_d, tpa_top_k=cfg.tpa_top_k, tpa_proposal=cfg.tpa_proposal,
                             tpa_max_positions=cfg.tpa_max_positions, iva_max_positions=cfg.iva_max_positions,
                             iva_top_k=cfg.iva_top_k, iva_layer=iva_layer, irs_scores=irs, seed=cfg.seed,
                             max_length=cfg.max_length)
    manifest = CacheManifest.create(fingerprint_model_dir(cfg.teacher), settings, extra={
        "data": str(Path(cfg.data).resolve()), "image_root": str(Path(cfg.image_root).resolve()),
        "teacher": str(Path(cfg.teacher).resolve()), "backend": cfg.backend})
    return Teacher(model, parts, encoder, settings, manifest, device, dtype, teacher_config.image_token_id)


def signal_backend(cfg: ExtractConfig, t: Teacher) -> Callable[[Batch], list]:
    """batch -> its samples' `SampleSignals`, from the transformers teacher or vLLM."""
    if cfg.backend == "vllm":
        return vllm_teacher(cfg, t.settings, t.device, t.dtype, t.image_token_id)
    return HfTeacher(t.model, t.settings, t.pad_id, cfg.chunk_size)


def run_extract(cfg: ExtractConfig) -> dict:
    """Run the teacher over the corpus and write the cache (or, with --dry-run, estimate it); returns
    the summary."""
    if cfg.dry_run:
        from alignti.extract.dry_run import dry_run  # it imports this module

        return dry_run(cfg)
    start = time.time()
    worker, num_workers = resolve_worker(*parse_worker(cfg.worker))
    # --out too (read-only): an existing cache without --resume/--overwrite is said before the teacher loads
    check_can_open(local_root(cfg.out), num_workers, resume=cfg.resume, overwrite=cfg.overwrite)
    t = load_teacher(cfg)
    encoder, pad_id, settings = t.encoder, t.pad_id, t.settings
    writer = CacheWriter.open(cfg.out, t.manifest, worker=worker, num_workers=num_workers, resume=cfg.resume,
                              overwrite=cfg.overwrite, part_size=cfg.part_size, retry_rejects=cfg.retry_rejects)
    teacher = signal_backend(cfg, t)
    stats = {"written": 0, "skipped": 0, "tokens": 0, "teacher_seconds": 0.0, "rejects": Counter()}
    with writer:
        write_run_file(cfg, local_root(cfg.out) / RUN_YAML, "extract", note="informative: not part of the cache; "
                       "with several workers, the latest to start wrote it")
        committed, rejected = writer.committed_ids(), writer.rejected_source_ids()

        def samples() -> Iterator[EncodedSample]:
            for row in worker_rows(cfg.data, worker, num_workers, cfg.limit):
                if row.source_id in rejected:  # rejects are deterministic: it would be rejected again
                    continue
                enc = row if isinstance(row, Reject) else encoder.encode(row)
                if isinstance(enc, Reject):
                    stats["rejects"][enc.reason] += writer.add_reject(enc.source_id, enc.reason, enc.detail)
                else:
                    yield enc

        total = None if cfg.resume else sum(1 for _ in worker_rows(cfg.data, worker, num_workers, cfg.limit))
        bar = progress_bar(desc=f"extract w{worker}/{num_workers}", unit="sample", total=total)
        loop_start = time.time()
        # Batches are cut from every row, committed or not, so a resume forms the batches of an
        # uninterrupted run (outputs depend slightly on batch mates: padding width, reduction order).
        # A batch all committed is skipped; a partly committed one runs whole, its committed rows dropped.
        for group in length_grouped(samples(), cfg.batch_size):
            todo = {s.sample_id for s in group} - committed
            stats["skipped"] += sum(s.sample_id not in todo for s in group)
            if todo:
                t0 = time.time()
                signals = teacher(collate(group, pad_id))
                stats["teacher_seconds"] += time.time() - t0
                for sig in signals:
                    if sig.sample_id in todo:
                        stats["written"] += writer.add(sig)
                stats["tokens"] += sum(s.length for s in group)
            elapsed = max(time.time() - start, 1e-9)
            bar.update(len(group))
            bar.set_postfix(tok_s=f"{stats['tokens'] / elapsed:.0f}", rejects=sum(stats["rejects"].values()))
        bar.close()
    stats["loop_seconds"] = time.time() - loop_start  # encode + teacher + writes, no model load or IRS
    return _summary(cfg, stats, worker, num_workers, settings.iva_layer, time.time() - start)


def _summary(cfg: ExtractConfig, stats: dict, worker: int, num_workers: int, iva_layer: int | None,
             wall: float) -> dict:
    from alignti.storage.reader import CacheReader
    from alignti.storage.stats import signal_bytes

    reader = CacheReader.open(cfg.out)
    per_signal, total = signal_bytes(reader)
    n_tok = max(reader.num_response_tokens, 1)
    return {
        "cache": cfg.out, "worker": f"{worker}/{num_workers}", "samples_written": stats["written"],
        "samples_skipped_resume": stats["skipped"], "rejects": dict(stats["rejects"]),
        "cache_samples": len(reader), "cache_response_tokens": reader.num_response_tokens,
        "bytes_per_response_token": round(total / n_tok, 1),
        "bytes_per_response_token_by_signal": {k: round(v / n_tok, 1) for k, v in per_signal.items()},
        "iva_layer": iva_layer, "tokens": stats["tokens"], "teacher_seconds": round(stats["teacher_seconds"], 3),
        "loop_seconds": round(stats["loop_seconds"], 3),
        "wall_seconds": round(wall, 3), "samples_per_second": round(stats["written"] / max(wall, 1e-9), 2),
    }
