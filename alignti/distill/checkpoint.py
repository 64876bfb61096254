"""Distillation output directory, checkpoints (save / find / load / prune) and the final save.

A checkpoint `OUT/checkpoints/step-N/` holds:
- `trainable.safetensors`: the trainable parameters (fp32 master weights, full tensors also
  under FSDP); frozen ones come back from the student directory, whose weights hash
  `state.json` records;
- `optimizer.pt`, `scheduler.pt`: state dicts saved with `torch.save`, read back with
  `torch.load(weights_only=True)` (tensors, numbers, lists, dicts only; never pickled code); under
  FSDP the optimizer's is the full, parameter-name-keyed one (`distill/sharding.py`);
- `rng-<rank>.pt`: each process's torch CPU (and CUDA) generator state;
- `state.json`: step, data cursor (epoch, step in epoch), processes x micro-batches per step,
  whether FSDP wrote it, the config, the student's weights hash. Written last.
It is built in `checkpoints/.tmp-step-N` and renamed into place, so a kill at any moment leaves
either a complete checkpoint or none (stale temp dirs are removed on the next save).
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from alignti.distill.config import resume_differences
from alignti.errors import AlignTIError
from alignti.storage.files import FileLock, fsync_path, write_errors, write_json_atomic

CHECKPOINTS = "checkpoints"
FINAL = "final"
LOG = "log.jsonl"
RUN_JSON = "distill.json"  # written at start: marks the directory as a distill output
RUN_FILE = "distill.yaml"  # the run's options, as `alignti distill --config` reads them (rewritten on resume)
STATE = "state.json"
_PREFIX = "step-"
# What a full disk raises while saving: OSError, torch.save's RuntimeError ("unexpected pos ..."),
# safetensors' SafetensorError. The data saved is ours, so these are the file system's errors.
WRITE_ERRORS = (OSError, RuntimeError, SafetensorError)


def list_checkpoints(out: str | Path) -> list[Path]:
    """Complete checkpoints (state.json present), oldest first."""
    root = Path(out) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        tail = p.name[len(_PREFIX):]
        if p.name.startswith(_PREFIX) and tail.isdigit() and (p / STATE).is_file():
            found.append((int(tail), p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(out: str | Path) -> Path | None:
    found = list_checkpoints(out)
    return found[-1] if found else None


def check_output_dir(out: str | Path, resume: bool, overwrite: bool) -> None:
    """AlignTIError (nothing touched) if `out` holds something we may not replace or reuse.

    An existing non-empty `out` needs --resume or --overwrite, and --overwrite only deletes a
    directory that a previous distill run created (it has distill.json), never arbitrary data.
    """
    p = Path(out)
    if p.exists() and not p.is_dir():
        raise AlignTIError(f"--out {str(p)!r} exists and is not a directory")
    if overwrite and p.is_symlink():  # --overwrite deletes --out: name the directory, not a link to it
        raise AlignTIError(f"--out {str(p)!r} is a symbolic link; pass the directory itself ({str(p.resolve())!r})")
    if not p.is_dir() or not any(p.iterdir()):
        return
    ours = (p / RUN_JSON).is_file()
    if not resume and not overwrite:
        raise AlignTIError(f"--out {str(p)!r} already exists; pass --resume to continue it or --overwrite to "
                           f"replace it")
    if not ours:
        raise AlignTIError(f"--out {str(p)!r} is not empty and was not written by alignti distill; refusing to "
                           f"{'resume into' if resume else 'delete'} it")


def lock_output_dir(out: str | Path) -> FileLock:
    """The lock a run holds on `out` from its first write to its exit (main process), so a second run
    into the same directory (fresh, --resume or --overwrite) is refused before it writes or deletes
    anything. It lives beside `out` (--overwrite deletes `out` itself) and goes with the run."""
    p = Path(out).resolve()
    p.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(p.parent / f".{p.name}.distill-lock", f"another alignti distill run is using --out {str(out)!r}",
                    remove=True)


def start_output_dir(out: str | Path, overwrite: bool, run_info: dict[str, Any]) -> None:
    """Create (or, with overwrite, empty) `out` and write distill.json. Main process only."""
    p = Path(out)
    if overwrite and p.is_dir():
        shutil.rmtree(p)
    p.mkdir(parents=True, exist_ok=True)
    _write_json(p / RUN_JSON, run_info)


def _write_json(path: Path, obj: Any) -> None:
    write_json_atomic(path, obj, indent=1, sort_keys=True)


def rng_state() -> dict[str, torch.Tensor]:
    """This process's torch generator states (CPU, and every CUDA device when present)."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            state[f"cuda{i}"] = s
    return state


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["cpu"])
    if torch.cuda.is_available():
        cuda = [state[k] for k in sorted((k for k in state if k.startswith("cuda")), key=lambda k: int(k[4:]))]
        if cuda:
            torch.cuda.set_rng_state_all(cuda)


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """{name: contiguous CPU copy} of every parameter with requires_grad."""
    return {n: p.detach().to("cpu", copy=True).contiguous() for n, p in model.named_parameters() if p.requires_grad}


def temp_checkpoint_dir(out: str | Path, step: int) -> Path:
    return Path(out) / CHECKPOINTS / f".tmp-{_PREFIX}{step}"


def begin_checkpoint(out: str | Path, step: int) -> Path:
    """Fresh temp dir for checkpoint `step` (main process; the others write into it after a barrier)."""
    root = Path(out) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-*"):  # left by a run killed mid-save
        shutil.rmtree(stale, ignore_errors=True)
    tmp = temp_checkpoint_dir(out, step)
    with write_errors("checkpoint", tmp):
        tmp.mkdir()
    return tmp


def write_rank_rng(tmp: Path, rank: int) -> None:
    state = rng_state()
    with write_errors("checkpoint", tmp, temp=tmp, kinds=WRITE_ERRORS):
        torch.save(state, tmp / f"rng-{rank}.pt")


def finish_checkpoint(tmp: Path, weights: dict[str, torch.Tensor], optimizer_state: dict[str, Any], scheduler: Any,
                      state: dict[str, Any], keep: int) -> Path:
    """Write weights (trainable, full CPU tensors), optimizer state, scheduler and state.json into
    `tmp`, rename it into place, prune. A failed write (disk full) removes `tmp` and is one
    AlignTIError line; older checkpoints stay."""
    final = tmp.parent / f"{_PREFIX}{state['step']}"  # OUT/checkpoints/step-N
    sched = scheduler.state_dict()
    with write_errors("checkpoint", final, temp=tmp, kinds=WRITE_ERRORS):
        save_file(weights, str(tmp / "trainable.safetensors"))
        torch.save(optimizer_state, tmp / "optimizer.pt")
        torch.save(sched, tmp / "scheduler.pt")
        _write_json(tmp / STATE, state)
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if final.exists():  # a resumed run re-saving a step it already saved
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_path(tmp.parent)
    if keep > 0:
        for old in list_checkpoints(tmp.parent.parent)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def save_checkpoint(acc: Any, out: str | Path, weights: dict[str, torch.Tensor], optimizer_state: dict[str, Any],
                    scheduler: Any, state: dict[str, Any], keep: int) -> None:
    """Collective (every process calls it): the main process writes weights, optimizer state (both
    as gathered by the caller; other processes pass {}), scheduler and state.json (with
    state["step"]); every process writes its RNG state. acc: an Accelerator."""
    step = int(state["step"])
    if acc.is_main_process:
        begin_checkpoint(out, step)
    acc.wait_for_everyone()
    tmp = temp_checkpoint_dir(out, step)
    write_rank_rng(tmp, acc.process_index)
    acc.wait_for_everyone()
    if acc.is_main_process:
        finish_checkpoint(tmp, weights, optimizer_state, scheduler, state, keep)
    acc.wait_for_everyone()


def read_state(ckpt: Path) -> dict[str, Any]:
    try:
        return json.loads((ckpt / STATE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise AlignTIError(f"checkpoint {str(ckpt)!r} has an unreadable state.json: {e}") from None


def check_resume(cfg: Any, path: Path, per_step: int, student_weights: str, fsdp: bool) -> dict[str, Any]:
    """The checkpoint's state.json, after checking that it belongs to this run.

    cfg: the DistillConfig resuming; per_step: micro-batches per optimizer step over all
    processes (must match: it decides which samples form each step); student_weights: the
    student directory's weights hash (frozen weights are reloaded from it); fsdp: whether this run
    shards (the optimizer state is stored another way).
    """
    state = read_state(path)
    diffs = resume_differences(cfg, state.get("config", {}))
    if diffs:
        raise AlignTIError(f"--resume: options differ from the checkpoint's run: {', '.join(diffs)}")
    if state.get("student_weights") != student_weights:
        raise AlignTIError("--resume: the student directory's weights changed since the checkpoint was written")
    if state.get("micro_batches_per_step") != per_step:
        raise AlignTIError(f"--resume: the checkpoint used {state.get('micro_batches_per_step')} micro-batches per "
                           f"step (processes x --grad-accum), this run {per_step}: keep the global batch")
    if bool(state.get("fsdp", False)) != fsdp:
        raise AlignTIError(f"--resume: the checkpoint was written {'with' if state.get('fsdp') else 'without'} FSDP, "
                           f"this run is launched {'with' if fsdp else 'without'}: use the same accelerate config")
    return state


def _load_tensors(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # PyTorch's message would advise weights_only=False: never for our files
        raise AlignTIError(f"cannot read {str(path)!r}: it is not plain tensor data (a pickle of other objects) "
                           f"and is refused") from None
    except Exception as e:  # corrupt or truncated file
        raise AlignTIError(f"cannot read {str(path)!r}: {type(e).__name__}: {' '.join(str(e).split())[:200]}") from None


def load_trainable(ckpt: Path, model: torch.nn.Module) -> None:
    """Copy the checkpoint's weights into `model`'s trainable parameters (names must match exactly)."""
    try:
        saved = load_file(str(ckpt / "trainable.safetensors"))
    except Exception as e:
        raise AlignTIError(f"checkpoint {str(ckpt)!r}: unreadable trainable.safetensors ({e})") from None
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(saved) != set(params):
        diff = sorted(set(saved) ^ set(params))
        raise AlignTIError(f"checkpoint {str(ckpt)!r} trains other parameters than this run (e.g. {diff[0]}); "
                           f"was --train changed?")
    with torch.no_grad():
        for n, p in params.items():
            if saved[n].shape != p.shape:
                raise AlignTIError(f"checkpoint {str(ckpt)!r}: {n} has shape {tuple(saved[n].shape)}, "
                                   f"the student {tuple(p.shape)}")
            p.copy_(saved[n])


def load_optimizer_state(ckpt: Path, load_optimizer: Callable[[dict[str, Any]], None], scheduler: Any) -> None:
    """Give optimizer.pt's state dict to `load_optimizer` (e.g. `optimizer.load_state_dict`) and
    restore the scheduler."""
    load_optimizer(_load_tensors(ckpt / "optimizer.pt"))
    scheduler.load_state_dict(_load_tensors(ckpt / "scheduler.pt"))


def load_rank_rng(ckpt: Path, rank: int) -> bool:
    """Restore this process's generator state; False if the checkpoint has none for `rank` (it was
    written by fewer processes: the caller keeps its seeded state and says so)."""
    path = ckpt / f"rng-{rank}.pt"
    if not path.is_file():
        return False
    set_rng_state(_load_tensors(path))
    return True


def truncate_log(out: str | Path, step: int) -> None:
    """Drop log lines after `step` (steps a killed run logged after its last checkpoint)."""
    path = Path(out) / LOG
    if not path.is_file():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue  # a line torn by the kill
    with write_errors("the training log", path):
        path.write_text("".join(f"{line}\n" for line in keep), encoding="utf-8")


def saved_dtype(student: str | Path) -> torch.dtype:
    """The dtype the student directory stores its weights in (the final save keeps it)."""
    try:
        config = json.loads((Path(student) / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return torch.float32
    name = config.get("dtype") or config.get("torch_dtype") or (config.get("text_config") or {}).get("dtype")
    return {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(str(name), torch.float32)


def save_final(model: torch.nn.Module, parts: Any, out: str | Path, dtype: torch.dtype) -> Path:
    """`save_pretrained` model (in `dtype`) + its parts (`ModelParts`: tokenizer, processor files) into
    OUT/final, via a temp dir + rename."""
    final = Path(out) / FINAL
    tmp = Path(out) / f".tmp-{FINAL}"
    if tmp.exists():
        shutil.rmtree(tmp)
    model.to(dtype)
    with write_errors("the final model", final, temp=tmp, kinds=WRITE_ERRORS):
        model.save_pretrained(tmp)
        parts.save(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    return final
