"""`alignti distill --report-to`: the run's step records to an experiment tracker, through accelerate's.

`tensorboard` writes event files to `OUT/tensorboard/`; `wandb` logs to Weights & Biases (offline
into `OUT/wandb/` with `WANDB_MODE=offline`). Each step logs every computed loss term, the weighted
total, the learning rate, the gradient norm and tokens/s (the numbers `log.jsonl` holds). A resumed
run appends to the same tracker run: TensorBoard hides the steps a killed run logged after its last
checkpoint (`purge_step`), W&B resumes the run id kept in `OUT/distill.json`.

`DistillConfig` checks that the tracker's package is installed, before any work.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

from alignti.distill.checkpoint import RUN_JSON

TENSORBOARD_DIR = "tensorboard"  # OUT/tensorboard/: accelerate's run directory inside OUT
WANDB_PROJECT = "alignti"
LOGGED = ("loss", "sft", "kd", "iva", "tpa", "ground", "lr", "grad_norm", "tokens_per_second", "tokens")


def log_with(report_to: str) -> str | None:
    """accelerate's `Accelerator(log_with=...)` for --report-to."""
    return None if report_to == "none" else report_to


def new_run_id() -> str:
    """The tracker run id a fresh distill run records in distill.json (W&B resumes it)."""
    return uuid.uuid4().hex[:16]


def start(acc: Any, report_to: str, out: str, config: dict[str, Any], start_step: int) -> None:
    """`acc.init_trackers` after OUT exists (main process; acc: an Accelerator made with `log_with`).
    config: the run's flat options, logged as hyper-parameters."""
    if report_to == "none":
        return
    hparams = {k: v if isinstance(v, (int, float, str, bool)) or v is None else str(v) for k, v in config.items()}
    run_id = json.loads((Path(out) / RUN_JSON).read_text(encoding="utf-8")).get("run_id") or new_run_id()
    kwargs = {"tensorboard": {"purge_step": start_step + 1} if start_step else {},
              "wandb": {"dir": out, "name": Path(out).name, "id": run_id, "resume": "allow"}}
    project = TENSORBOARD_DIR if report_to == "tensorboard" else WANDB_PROJECT
    acc.init_trackers(project, config=hparams, init_kwargs={report_to: kwargs[report_to]})


def log_step(acc: Any, record: dict[str, Any]) -> None:
    """One step's record (as written to log.jsonl) to the trackers, as `train/<name>` scalars."""
    if acc.trackers:
        acc.log({f"train/{k}": record[k] for k in LOGGED if record.get(k) is not None}, step=int(record["step"]))
