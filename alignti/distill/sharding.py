"""FSDP for `alignti distill`: torch's FSDP2 `fully_shard`, applied here, launched by accelerate.

It is chosen by the accelerate config (`distributed_type: FSDP`, examples/accelerate/fsdp.yaml):
`accelerate launch` starts the processes and exports ACCELERATE_USE_FSDP=true, accelerate forms
the process group (NCCL on GPU, gloo on CPU), and `shard` splits the student: each decoder
layer is one FSDP group, everything else (embeddings, LM head, norm, projector, vision tower)
one root group on the `Objective`, whose forward is the root forward (the fused loss applies
the LM head inside it). accelerate's own FSDP wrapping is never used: it does nothing on a
machine without a GPU (it falls back to DDP there), so CPU (CI) and GPU run one code path.

Settings read from the accelerate config: `fsdp_version` must be 2; `fsdp_reshard_after_forward`
(true: a layer's gathered weights are freed after its forward and gathered again for backward;
false: kept until backward, ZeRO-2-like). Refused, with one line: `fsdp_offload_params` and
`fsdp_activation_checkpointing` (use --gradient-checkpointing). Not read, because one thing is
always done: the wrap policy (each decoder layer), the state-dict type (checkpoints hold full
tensors), prefetching. DeepSpeed is refused (`launch_sharding`; examples/accelerate/README.md
says why and what it would need).

Training: gradients are reduce-scattered (averaged, as DDP does) after every micro-batch, so no
unsharded gradient outlives a backward; every process runs as many micro-batches per step
(`order.rank_share(even=True)`), since every forward gathers weights from all of them.

Checkpoints: the weights gathered to full tensors and the optimizer state as one full,
parameter-name-keyed state dict (torch.distributed.checkpoint `get_*_state_dict` with
full_state_dict and cpu_offload), written by the main process; on resume every process reads the
file and keeps its own shard, so resuming is exact and does not depend on how the shards fell.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions, get_model_state_dict, get_optimizer_state_dict, set_optimizer_state_dict,
)
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from alignti.errors import AlignTIError
from alignti.models.loading import load_model

_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


@dataclass(frozen=True)
class FsdpSettings:
    reshard_after_forward: bool = True


def _flag(env: Mapping[str, str], name: str, default: str = "false") -> str:
    return env.get(name, default).strip().lower()


def launch_sharding(env: Mapping[str, str] = os.environ) -> FsdpSettings | None:
    """FSDP settings if the accelerate launch config asks for FSDP, None for DDP or one process.

    AlignTIError (before any work) for DeepSpeed and for FSDP settings this loop does not implement.
    """
    if _flag(env, "ACCELERATE_USE_DEEPSPEED") == "true":
        raise AlignTIError("DeepSpeed is not supported: its engine scales the loss by 1/gradient_accumulation_steps, "
                           "steps the optimizer on every accelerator.backward, clips and casts to bf16 itself and "
                           "partitions the optimizer state, all of which this loop does its own way "
                           "(examples/accelerate/README.md); use the FSDP config (examples/accelerate/fsdp.yaml)")
    if _flag(env, "ACCELERATE_USE_FSDP") != "true":
        return None
    if env.get("FSDP_VERSION", "1").strip() != "2":
        raise AlignTIError(f"FSDP: alignti shards with FSDP2 (fully_shard); set fsdp_version: 2 in the accelerate "
                           f"config (got {env.get('FSDP_VERSION', '1 (the default)')}), see examples/accelerate/fsdp.yaml")
    for name, instead in (("FSDP_OFFLOAD_PARAMS", "keep the parameters on the device"),
                          ("FSDP_ACTIVATION_CHECKPOINTING", "use --gradient-checkpointing")):
        if _flag(env, name) == "true":
            raise AlignTIError(f"FSDP: {name.lower()} is not supported; {instead}")
    reshard = _flag(env, "FSDP_RESHARD_AFTER_FORWARD", "true")
    if reshard not in ("true", "false"):
        raise AlignTIError(f"FSDP: fsdp_reshard_after_forward must be true or false with fsdp_version 2, got {reshard!r}")
    return FsdpSettings(reshard_after_forward=reshard == "true")


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The language model's decoder layers (LLaVA-style and Qwen-VL models alike)."""
    layers = getattr(model.get_decoder(), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise ValueError(f"{type(model).__name__}: no decoder layer list to shard")
    return layers


def shard(objective: torch.nn.Module, model: torch.nn.Module, settings: FsdpSettings,
          unused_parameters: bool) -> None:
    """Shard in place (before the optimizer is built: the parameters become DTensors).

    unused_parameters: some micro-batch may leave trainable parameters out of the graph (a
    text-only sample skips the projector); their zero gradients are then reduce-scattered too,
    so every process joins the same collectives.
    """
    for layer in decoder_layers(model):
        fully_shard(layer, reshard_after_forward=settings.reshard_after_forward)
    fully_shard(objective, reshard_after_forward=settings.reshard_after_forward)
    if unused_parameters:
        objective.set_reduce_scatter_unused_params(True)


def as_local(value: Any) -> Any:
    """A DTensor (e.g. the clipped gradient norm) as its full value; anything else as it is."""
    return value.full_tensor() if isinstance(value, DTensor) else value


def full_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Collective: every parameter and buffer as a full CPU tensor on the main process ({} elsewhere)."""
    return get_model_state_dict(model, options=_FULL)


def full_optimizer_state(objective: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Collective: the optimizer state keyed by parameter name, full CPU tensors, on the main process."""
    return get_optimizer_state_dict(objective, optimizer, options=_FULL)


def load_full_optimizer_state(objective: torch.nn.Module, optimizer: torch.optim.Optimizer,
                              state: dict[str, Any]) -> None:
    """Collective: every process gives the full state (`full_optimizer_state`) and keeps its shard.
    Parameters that never had a gradient have no state in it, as in the run that wrote it."""
    set_optimizer_state_dict(objective, optimizer, state,
                             options=StateDictOptions(full_state_dict=True, strict=False))


def unsharded_copy(student: str, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A plain CPU copy of the student directory's model holding `state` (for `save_pretrained`)."""
    model = load_model(student, "cpu", torch.float32)
    model.load_state_dict(state, strict=True)
    return model
