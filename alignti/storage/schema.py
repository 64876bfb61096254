"""The cache schema: the single source of truth for names, dtypes, symbolic shapes and meaning.

Writer, reader, extract and distill import from here. `docs/cache-format.md` describes the same
layout for people reading a cache with zarr and pyarrow alone; `tests/storage` checks that the
two agree.

Symbolic dimensions: L text tokens (unexpanded), S label spans, N_r response rows of one sample,
k = settings.top_k, N_c TPA rows, d = settings.tpa_d, k_t = settings.tpa_top_k, n_v vision
tokens, P salient vision positions, k_v = settings.iva_top_k. Inside one part the per-sample
ragged data is concatenated: R = sum N_r, C = sum N_c, W = sum len(saliency), Q = sum P.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np

from alignti import __version__
from alignti.errors import AlignTIError

SCHEMA_VERSION = 1

# Log-probs are stored as integer codes on a grid of LOGPROB_STEP nats (see storage/encoding.py).
LOGPROB_STEP = 2.0**-10
LOGPROB_CODE_DTYPE = "uint16"

# Keys every teacher fingerprint must carry (values: hex digests or ints).
FINGERPRINT_KEYS = ("config", "weights", "tokenizer", "chat_template", "processor", "vocab_size",
                    "num_hidden_layers")
# Keys that must match between the cache's teacher and a student for the token ids to line up.
STUDENT_COMPAT_KEYS = ("tokenizer", "chat_template")

# Reject reasons the corpus/encode code emits (alignti.data.corpus); other snake_case strings
# are accepted so that new reasons need no schema change.
KNOWN_REJECT_REASONS = ("malformed_row", "missing_image", "corrupt_image", "path_outside_root",
                        "no_assistant_turn", "image_token_mismatch", "too_long")


@dataclass(frozen=True, eq=False)
class SampleSignals:
    """One sample's teacher signals (numpy arrays). Produced by extract, consumed by distill."""

    sample_id: str  # content hash (hex str) computed by extract; unique key
    source_id: str  # corpus row id
    image_path: str  # relative to the image root; "" for text-only
    image_sha256: str  # "" for text-only
    text_ids: np.ndarray  # int32 [L] unexpanded text token ids (image token once per image)
    label_spans: np.ndarray  # int32 [S, 2] half-open EXPANDED ranges of labelled tokens
    n_v: int  # vision tokens per image (0 for text-only)
    vision_start: int  # expanded position of the first vision token (-1 if none)
    resp_positions: np.ndarray  # int32 [N_r] expanded positions whose NEXT token is a response token
    topk_ids: np.ndarray  # int32 [N_r, k] teacher top-k ids, by descending log-prob
    topk_logprobs: np.ndarray  # float32 [N_r, k] teacher log-probs (log-softmax, T=1), descending
    tpa_rows: np.ndarray  # int32 [N_c] indices into the N_r response rows with candidates (ascending)
    tpa_cand_ids: np.ndarray  # int32 [N_c, d] candidate tokens a_{t,j}
    tpa_cand_logprobs: np.ndarray  # float32 [N_c, d] teacher log p_T(a_{t,j} | y_<t)
    tpa_topk_ids: np.ndarray  # int32 [N_c, d, k_t] top-k_t of p_T(.|y_<t, a_{t,j}), descending
    tpa_topk_logprobs: np.ndarray  # float32 [N_c, d, k_t]
    saliency: np.ndarray  # float32 [n_v] IVA weights summing to 1 ([0] if no IVA / text-only)
    iva_positions: np.ndarray  # int32 [P] indices (0..n_v-1) into the vision tokens, most salient first
    iva_topk_ids: np.ndarray  # int32 [P, k_v] teacher top-k_v at those vision positions
    iva_topk_logprobs: np.ndarray  # float32 [P, k_v]

    @property
    def num_response_tokens(self) -> int:
        return int(self.resp_positions.shape[0])


@dataclass(frozen=True)
class CacheSettings:
    """Extraction settings recorded in cache.json (resume refuses to mix different settings)."""

    top_k: int = 64
    tpa_d: int = 4
    tpa_top_k: int = 16
    tpa_proposal: str = "top"
    tpa_max_positions: int | None = None
    iva_max_positions: int = 64
    iva_top_k: int = 16
    iva_layer: int | None = None
    irs_scores: list[float] | None = None
    seed: int = 0
    max_length: int = 2048

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CacheSettings:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise AlignTIError(f"cache.json settings has unknown keys {unknown}")
        return cls(**d)


@dataclass(frozen=True)
class CacheManifest:
    """Content of CACHE/cache.json, written once when the cache is created.

    Identity (what resume compares and every part records a hash of): schema_version,
    teacher_fingerprint, settings (except irs_scores) and encoding. irs_scores, created_by,
    created_at and extra are informative: IRS may be recomputed on resume with float noise,
    while the iva_layer it chose is part of the identity.
    """

    schema_version: int
    teacher_fingerprint: dict[str, str | int]
    settings: CacheSettings
    created_by: str = __version__
    encoding: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_ENCODING))
    created_at: float = 0.0  # unix time, set by the writer when it creates cache.json
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. corpus path; not part of identity

    @classmethod
    def create(cls, teacher_fingerprint: dict[str, str | int], settings: CacheSettings,
               extra: dict[str, Any] | None = None) -> CacheManifest:
        return cls(SCHEMA_VERSION, dict(teacher_fingerprint), settings, extra=dict(extra or {}))

    def identity(self) -> dict[str, Any]:
        settings = self.settings.to_dict()
        del settings["irs_scores"]
        return {"schema_version": self.schema_version, "teacher_fingerprint": self.teacher_fingerprint,
                "settings": settings, "encoding": self.encoding}

    def identity_hash(self) -> str:
        """sha256 of the canonical JSON of `identity()`; stored in every part.json."""
        blob = json.dumps(self.identity(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()

    def to_dict(self) -> dict[str, Any]:
        d = self.identity()
        d.update(settings=self.settings.to_dict(), created_by=self.created_by, created_at=self.created_at,
                 extra=self.extra)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "cache.json") -> CacheManifest:
        if not isinstance(d, dict):
            raise AlignTIError(f"{where} is not a JSON object")
        version = d.get("schema_version")
        if version != SCHEMA_VERSION:
            raise AlignTIError(f"{where} has schema_version {version!r}; this alignti {__version__} "
                               f"reads schema_version {SCHEMA_VERSION} only")
        missing = [k for k in ("teacher_fingerprint", "settings", "encoding") if k not in d]
        if missing:
            raise AlignTIError(f"{where} is missing {missing}")
        try:
            m = cls(version, dict(d["teacher_fingerprint"]), CacheSettings.from_dict(d["settings"]),
                    str(d.get("created_by", "?")), dict(d["encoding"]), float(d.get("created_at", 0.0)),
                    dict(d.get("extra", {})))
        except (TypeError, ValueError, AttributeError) as e:
            raise AlignTIError(f"{where} is malformed ({type(e).__name__}: {e})") from None
        try:
            check_fingerprint(m.teacher_fingerprint, f"{where} teacher_fingerprint")
        except ValueError as e:
            raise AlignTIError(str(e)) from None
        if m.encoding != DEFAULT_ENCODING:
            raise AlignTIError(f"{where} uses encoding {m.encoding}; this alignti reads {DEFAULT_ENCODING}")
        return m


DEFAULT_ENCODING: dict[str, Any] = {"logprob_step": LOGPROB_STEP, "logprob_code_dtype": LOGPROB_CODE_DTYPE,
                                    "logprob_rounding": "toward_-inf"}


def check_fingerprint(fp: dict[str, Any], what: str = "teacher fingerprint") -> None:
    """ValueError unless `fp` has every FINGERPRINT_KEYS key with a str/int value."""
    missing = [k for k in FINGERPRINT_KEYS if k not in fp]
    if missing:
        raise ValueError(f"{what} is missing {missing}")
    bad = [k for k, v in fp.items() if not isinstance(v, (str, int)) or isinstance(v, bool)]
    if bad:
        raise ValueError(f"{what} has non str/int values for {bad}")


def manifest_differences(a: CacheManifest, b: CacheManifest) -> list[str]:
    """Human-readable identity differences, e.g. 'settings.top_k: 64 != 32'."""
    out: list[str] = []
    ia, ib = a.identity(), b.identity()
    for key in ia:
        va, vb = ia[key], ib[key]
        if isinstance(va, dict) and isinstance(vb, dict):
            for sub in sorted(set(va) | set(vb)):
                if va.get(sub) != vb.get(sub):
                    out.append(f"{key}.{sub}: {va.get(sub)!r} != {vb.get(sub)!r}")
        elif va != vb:
            out.append(f"{key}: {va!r} != {vb!r}")
    return out


@dataclass(frozen=True)
class ArraySpec:
    """One array: its SampleSignals dtype/shape and how it is stored."""

    name: str
    dtype: str  # dtype in SampleSignals
    shape: tuple[str, ...]  # symbolic, per sample
    stored_dtype: str  # dtype of the Zarr array
    encoding: str  # "raw" | "float16" | "logprob_delta" | "logprob_abs"
    group: str  # ragged group: which per-sample count/offset columns index it
    signal: str  # bytes accounting bucket in inspect
    meaning: str


# group -> (per-sample count column, per-sample start column) in samples.parquet
GROUPS = {"resp": ("resp_count", "resp_start"), "tpa": ("tpa_count", "tpa_start"),
          "sal": ("sal_count", "sal_start"), "iva": ("iva_count", "iva_start")}

_A = ArraySpec
ARRAYS: tuple[ArraySpec, ...] = (
    _A("resp_positions", "int32", ("N_r",), "int32", "raw", "resp", "topk",
       "expanded positions t whose next token is a response token, ascending"),
    _A("topk_ids", "int32", ("N_r", "k"), "int32", "raw", "resp", "topk",
       "teacher top-k token ids at resp_positions, by descending log-prob"),
    _A("topk_logprobs", "float32", ("N_r", "k"), "uint16", "logprob_delta", "resp", "topk",
       "teacher log-probs (log-softmax, T=1) of topk_ids"),
    _A("tpa_rows", "int32", ("N_c",), "int32", "raw", "tpa", "tpa",
       "indices into the sample's N_r response rows that got TPA candidates, ascending"),
    _A("tpa_cand_ids", "int32", ("N_c", "d"), "int32", "raw", "tpa", "tpa", "candidate tokens a_{t,j}"),
    _A("tpa_cand_logprobs", "float32", ("N_c", "d"), "uint16", "logprob_abs", "tpa", "tpa",
       "teacher log p_T(a_{t,j} | y_<t)"),
    _A("tpa_topk_ids", "int32", ("N_c", "d", "k_t"), "int32", "raw", "tpa", "tpa",
       "top-k_t ids of p_T(. | y_<t, a_{t,j}), by descending log-prob"),
    _A("tpa_topk_logprobs", "float32", ("N_c", "d", "k_t"), "uint16", "logprob_delta", "tpa", "tpa",
       "log-probs of tpa_topk_ids"),
    _A("saliency", "float32", ("n_s",), "float16", "float16", "sal", "iva_saliency",
       "IVA instruction-to-vision weights over the n_v vision tokens (n_s = n_v, or 0 without IVA)"),
    _A("iva_positions", "int32", ("P",), "int32", "raw", "iva", "iva_topk",
       "vision-token indices (0..n_v-1) of the P most salient positions, most salient first"),
    _A("iva_topk_ids", "int32", ("P", "k_v"), "int32", "raw", "iva", "iva_topk",
       "teacher top-k_v ids at those vision positions"),
    _A("iva_topk_logprobs", "float32", ("P", "k_v"), "uint16", "logprob_delta", "iva", "iva_topk",
       "log-probs of iva_topk_ids"),
)
SAMPLE_ARRAYS: dict[str, ArraySpec] = {a.name: a for a in ARRAYS}
SAMPLE_ARRAYS["text_ids"] = _A("text_ids", "int32", ("L",), "list<int32>", "raw", "parquet", "metadata",
                               "unexpanded text token ids (image token once per image)")
SAMPLE_ARRAYS["label_spans"] = _A("label_spans", "int32", ("S", "2"), "list<int32>", "raw", "parquet",
                                  "metadata", "half-open [start, end) expanded ranges of labelled tokens")

# samples.parquet: one row per sample. (column, arrow type, meaning)
SAMPLE_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("sample_id", "string", "content hash of the sample; unique key"),
    ("source_id", "string", "corpus row id"),
    ("image_path", "string", "image path relative to the image root ('' for text-only)"),
    ("image_sha256", "string", "sha256 of the image bytes ('' for text-only)"),
    ("n_v", "int32", "vision tokens per image (0 for text-only)"),
    ("vision_start", "int32", "expanded position of the first vision token (-1 if none)"),
    ("text_ids", "list<int32>", "unexpanded text token ids [L]"),
    ("label_spans", "list<int32>", "label spans [S, 2] flattened row-major to 2*S ints"),
    ("resp_start", "int64", "first row of this sample in resp_positions/topk_*"),
    ("resp_count", "int32", "N_r"),
    ("tpa_start", "int64", "first row in tpa_*"),
    ("tpa_count", "int32", "N_c"),
    ("sal_start", "int64", "first element in saliency"),
    ("sal_count", "int32", "len(saliency): n_v, or 0 without IVA"),
    ("iva_start", "int64", "first row in iva_*"),
    ("iva_count", "int32", "P"),
)
# rejects.parquet (per part): samples the extractor skipped.
REJECT_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("source_id", "string", "corpus row id ('' if the row had none)"),
    ("reason", "string", "snake_case reason, e.g. missing_image"),
    ("detail", "string", "free text for humans"),
)

# On-disk layout names.
CACHE_JSON = "cache.json"
RUN_YAML = "extract.yaml"  # informative: the options of the latest extract run into the cache; never read
PARTS_DIR = "parts"
PART_JSON = "part.json"
SIGNALS_ZARR = "signals.zarr"
SAMPLES_PARQUET = "samples.parquet"
REJECTS_PARQUET = "rejects.parquet"
