"""`alignti extract` and `alignti irs` options, torch-free (the CLI reads them before any model
library loads; `alignti.extract.run` and `alignti.extract.irs` run them)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from alignti.errors import AlignTIError, check_min
from alignti.models.devices import check_device, check_dtype


@dataclass(frozen=True)
class IrsConfig:
    """`alignti irs` options."""

    teacher: str = field(metadata={"help": "teacher model directory"})
    data: str = field(metadata={"help": "corpus (LLaVA JSON or JSONL)"})
    image_root: str = field(metadata={"help": "directory image paths are relative to"})
    out: str = field(default="irs.json", metadata={
        "help": "output JSON (a .png plot and the run's options as .yaml are written beside it)"})
    samples: int = field(default=256, metadata={"help": "calibration samples (with images)"})
    batch_size: int = field(default=8, metadata={"help": "samples per forward"})
    max_length: int = field(default=2048, metadata={"help": "longest sample in tokens"})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda[:i]"})
    dtype: str = field(default="auto", metadata={"help": "auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16 | fp16"})

    def __post_init__(self) -> None:
        if Path(self.out).suffix in (".png", ".yaml"):
            raise AlignTIError(f"--out {self.out!r}: the .png and .yaml files are written beside it; name it .json")
        check_min(1, batch_size=self.batch_size)
        check_min(2, samples=self.samples)  # IRS compares calibration samples pairwise
        check_min(8, max_length=self.max_length)
        check_device(self.device)
        check_dtype(self.dtype)


@dataclass(frozen=True)
class ExtractConfig:
    """`alignti extract` options (defaults as in docs/method.md)."""

    teacher: str = field(metadata={"help": "teacher model directory"})
    data: str = field(metadata={"help": "corpus (LLaVA JSON or JSONL)"})
    image_root: str = field(metadata={"help": "directory image paths are relative to (never read outside it)"})
    out: str = field(metadata={"help": "cache directory"})
    top_k: int = field(default=64, metadata={"help": "top-k teacher log-probs per response token"})
    tpa_d: int = field(default=4, metadata={"help": "TPA candidates per response step (0 = no TPA)"})
    tpa_top_k: int = field(default=16, metadata={"help": "top-k_t of each candidate's next-token row"})
    tpa_proposal: str = field(default="top", metadata={"help": "top: teacher's top-d except y_t; sample: seeded draws",
                                                       "choices": ("top", "sample")})
    tpa_max_positions: int | None = field(default=None, metadata={
        "help": "response steps per sample that get candidates (most off-path mass first; default all)"})
    iva_layer: str = field(default="auto", metadata={"help": "auto (IRS) | none | LM layer index"})
    iva_max_positions: int = field(default=64, metadata={"help": "P: most salient vision positions kept"})
    iva_top_k: int = field(default=16, metadata={"help": "top-k_v teacher log-probs at salient vision positions"})
    irs_samples: int = field(default=256, metadata={"help": "calibration samples for --iva-layer auto"})
    batch_size: int = field(default=8, metadata={"help": "samples per teacher forward"})
    max_length: int = field(default=2048, metadata={"help": "longer samples are rejected (too_long)"})
    part_size: int = field(default=256, metadata={"help": "samples per committed cache part"})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda[:i] (LOCAL_RANK respected)"})
    dtype: str = field(default="auto", metadata={"help": "auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16 | fp16"})
    limit: int | None = field(default=None, metadata={"help": "only the first N corpus rows"})
    worker: str | None = field(default=None, metadata={"help": "i/n: this process handles rows i, i+n, ... "
                                                                "(default: RANK/WORLD_SIZE env, else 0/1)"})
    resume: bool = field(default=False, metadata={"help": "continue an existing cache (same teacher and settings)"})
    retry_rejects: bool = field(default=False, metadata={
        "help": "with --resume: try the rows the cache rejected again (after fixing images or the image root); "
                "a row that now works becomes a sample, one that fails again stays a reject with its new reason"})
    overwrite: bool = field(default=False, metadata={"help": "delete an existing cache first"})
    seed: int = field(default=0, metadata={"help": "seed for --tpa-proposal sample"})
    chunk_size: int = field(default=256, metadata={"help": "rows per LM-head chunk (memory bound)"})
    backend: str = field(default="hf", metadata={
        "help": "hf | vllm (log-probs from vLLM, saliency from the HF teacher cut after the IVA layer; "
                "--tpa-proposal top only; untested in CI)", "choices": ("hf", "vllm")})
    vllm_gpu_memory: float = field(default=0.6, metadata={
        "help": "vLLM's share of GPU memory; the cut HF teacher for saliency uses the rest"})
    dry_run: bool = field(default=False, metadata={
        "help": "plan only: read the corpus, count rejects, time a few teacher batches, estimate the cache's bytes "
                "and the wall time at --worker's worker count; writes nothing under --out"})
    dry_run_batches: int = field(default=3, metadata={"help": "teacher batches --dry-run times (after one warm-up)"})

    def __post_init__(self) -> None:
        if self.resume and self.overwrite:
            raise AlignTIError("--resume and --overwrite are mutually exclusive")
        if self.top_k < 1 or self.tpa_top_k < 1 or self.iva_top_k < 1 or self.tpa_d < 0:
            raise AlignTIError("top-k values must be >= 1 and --tpa-d >= 0")
        if self.tpa_proposal == "top" and self.tpa_d + 2 > self.top_k:
            raise AlignTIError("--tpa-proposal top needs --tpa-d <= --top-k - 2")
        if self.iva_layer not in ("auto", "none") and not self.iva_layer.lstrip("-").isdigit():
            raise AlignTIError(f"--iva-layer must be auto, none or an integer, got {self.iva_layer!r}")
        if self.retry_rejects and not self.resume:
            raise AlignTIError("--retry-rejects retries the rejects of the cache being resumed: it needs --resume")
        check_min(1, batch_size=self.batch_size, part_size=self.part_size, chunk_size=self.chunk_size,
                  iva_max_positions=self.iva_max_positions, tpa_max_positions=self.tpa_max_positions, limit=self.limit,
                  dry_run_batches=self.dry_run_batches)
        check_min(2, irs_samples=self.irs_samples)  # IRS compares calibration samples pairwise
        check_min(8, max_length=self.max_length)
        check_device(self.device)
        check_dtype(self.dtype)
        parse_worker(self.worker)
        if self.backend == "vllm":
            check_vllm_settings(self.tpa_d, self.tpa_proposal)
        if not 0.0 < self.vllm_gpu_memory < 1.0:
            raise AlignTIError("--vllm-gpu-memory must be in (0, 1)")


def parse_worker(spec: str | None) -> tuple[int | None, int | None]:
    """'i/n' -> (i, n); None -> (None, None) (the writer then reads RANK/WORLD_SIZE)."""
    if spec is None:
        return None, None
    try:
        i, n = (int(x) for x in spec.split("/"))
    except ValueError:
        raise AlignTIError(f"--worker must look like i/n, got {spec!r}") from None
    if not 0 <= i < n:
        raise AlignTIError(f"--worker {spec}: need 0 <= i < n")
    return i, n


def check_vllm_settings(tpa_d: int, tpa_proposal: str) -> None:
    """vLLM returns top-n log-probs only, so seeded draws from the full distribution are impossible."""
    if tpa_d and tpa_proposal != "top":
        raise AlignTIError("--backend vllm supports --tpa-proposal top only (vLLM returns top-n log-probs, "
                           "not the full distribution that seeded draws need); use --backend hf for sample")
