"""Many processes: process-group setup, DDP / FSDP2 wrapping, activation checkpointing, and
full (unsharded) state dicts for checkpoints.

Parallelism is applied from outside the model, as in torchtitan:
- ``ddp``: `DistributedDataParallel` (Li et al. 2020) — every rank holds the whole model,
  gradients are averaged with all-reduce.
- ``fsdp``: FSDP2 `fully_shard` (Zhao et al. 2023, "PyTorch FSDP") on every transformer
  block (`model.layers`, plus `model.mtp` modules when present) and on the root — parameters,
  gradients and optimizer state are sharded along dim 0 as DTensors.
- context / pipeline parallelism (``training.context_parallel`` / ``pipeline_parallel``): the
  world laid out as a device mesh dp x cp or dp x pp (`init_parallel`). DDP / FSDP2 then average
  gradients over every rank (the cp ranks of a sequence each hold part of its gradient);
  pipeline stages reduce theirs over dp only (`trainer.pipeline`). Data loaders shard by
  ``dp_rank`` / ``dp_size``.
- activation checkpointing (Chen et al. 2016): each block's forward is recomputed in the
  backward pass (`torch.utils.checkpoint`, non-reentrant). The block's class is swapped for a
  subclass whose forward checkpoints, so parameter names and state dicts do not change.

Launch with ``torchrun --nproc_per_node=N script.py``: RANK / WORLD_SIZE / LOCAL_RANK come from
the environment; NCCL on CUDA (one GPU per local rank), gloo on CPU. A single process (no
torchrun) creates no process group and every collective below is a no-op.

Checkpoints are saved unsharded (`full_state_dict`, `full_optimizer_state_dict`) through
`torch.distributed.checkpoint.state_dict`, so a run saved with FSDP2 on N ranks resumes with
DDP, FSDP2 or a single process. Optimizer state dicts are keyed by parameter name (FQN).
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.checkpoint import checkpoint

from utils.config import TrainingConfig
from utils.device import pick_device
from utils.errors import UserError


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    is_distributed: bool
    # the world as a mesh dp x cp (context parallel) or dp x pp (pipeline parallel), the inner
    # dimension on neighbouring ranks; `init_parallel` sets it (None: data parallel only)
    cp: int = 1
    pp: int = 1
    mesh: Optional[DeviceMesh] = None

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that logs and writes checkpoints."""
        return self.rank == 0

    @property
    def dp_size(self) -> int:
        """Data-parallel replicas: the ranks that read different data."""
        return self.world_size // (self.cp * self.pp)

    @property
    def dp_rank(self) -> int:
        """Which share of the data this rank reads (its data loaders' rank)."""
        return self.rank // (self.cp * self.pp)

    @property
    def cp_rank(self) -> int:
        return self.rank % self.cp

    @property
    def pp_rank(self) -> int:
        return self.rank % self.pp

    def group(self, dim: str) -> dist.ProcessGroup:
        """The process group of mesh dimension ``dp``, ``cp`` or ``pp`` this rank belongs to."""
        assert self.mesh is not None, "init_parallel has not built a device mesh"
        return self.mesh[dim].get_group()


def _env_int(name: str) -> int:
    value = os.environ.get(name)
    if value is None:
        raise UserError(f"WORLD_SIZE is set but {name} is not: launch with torchrun --nproc_per_node=N")
    try:
        return int(value)
    except ValueError:
        raise UserError(f"environment variable {name}={value!r} is not an integer") from None


def init_distributed(device_pref: str = "auto") -> DistInfo:
    """Join the torchrun process group (if launched by torchrun) and pick this rank's device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo(rank=0, world_size=1, local_rank=0, device=pick_device(device_pref), is_distributed=False)
    rank, local_rank = _env_int("RANK"), _env_int("LOCAL_RANK")
    if device_pref == "mps":
        raise UserError("distributed training runs on cuda (nccl) or cpu (gloo), not mps")
    if device_pref == "cuda" and not torch.cuda.is_available():
        raise UserError("device cuda requested but CUDA is not available (use --device cpu or auto)")
    if device_pref in ("auto", "cuda") and torch.cuda.is_available():
        if local_rank >= torch.cuda.device_count():
            raise UserError(
                f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} GPU(s): "
                f"use --nproc_per_node <= {torch.cuda.device_count()}"
            )
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, device_id=device if backend == "nccl" else None)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=device, is_distributed=True)


def init_parallel(info: DistInfo, tcfg: TrainingConfig) -> DistInfo:
    """Lay the world out as dp x cp (``training.context_parallel``) or dp x pp
    (``training.pipeline_parallel``); one line and exit 2 when the degree does not divide it."""
    for key, degree in (("context_parallel", tcfg.context_parallel), ("pipeline_parallel", tcfg.pipeline_parallel)):
        if info.world_size % degree:
            raise UserError(f"training.{key}={degree} does not divide the world size {info.world_size} "
                            "(torchrun --nproc_per_node x nodes)")
    info.cp, info.pp = tcfg.context_parallel, tcfg.pipeline_parallel
    inner = info.cp * info.pp
    if inner > 1:
        names = ("dp", "cp" if info.cp > 1 else "pp")
        info.mesh = init_device_mesh(info.device.type, (info.world_size // inner, inner), mesh_dim_names=names)
    return info


def check_parallel(info: DistInfo, tcfg: TrainingConfig, stage: str) -> None:
    """Context / pipeline parallelism split sequences or layers, which only the causal LM loss
    of pretraining and SFT sums back exactly; and the mesh must be `init_parallel`'s."""
    if tcfg.context_parallel == 1 and tcfg.pipeline_parallel == 1:
        return
    if stage not in ("pretrain", "sft"):
        raise UserError(f"training.context_parallel / pipeline_parallel work in pretraining and SFT, not in {stage}")
    if (info.cp, info.pp) != (tcfg.context_parallel, tcfg.pipeline_parallel):
        raise RuntimeError("the process group was not laid out for this config: call init_parallel (trainer.launch)")


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def destroy_distributed() -> None:
    """Leave the process group (after a barrier: gloo can abort when ranks exit unevenly)."""
    if _initialized():
        dist.barrier()
        dist.destroy_process_group()


# ---------------------------------------------------------------- wrapping
_CHECKPOINTED_CLASSES: dict[type, type] = {}


def _checkpointed_class(cls: type) -> type:
    """A subclass of `cls` whose forward is recomputed in backward (activation checkpointing)."""
    if cls not in _CHECKPOINTED_CLASSES:

        def forward(self, *args: Any, **kwargs: Any) -> Any:
            return checkpoint(super(sub, self).forward, *args, use_reentrant=False, **kwargs)

        sub = type(f"Checkpointed{cls.__name__}", (cls,), {"forward": forward})
        _CHECKPOINTED_CLASSES[cls] = sub
    return _CHECKPOINTED_CLASSES[cls]


def _blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated transformer blocks: `model.layers` (+ `model.mtp` modules when present)."""
    layers = getattr(model, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise TypeError(f"{type(model).__name__} has no `layers` ModuleList of transformer blocks")
    mtp = getattr(model, "mtp", None)
    return list(layers) + (list(mtp) if isinstance(mtp, nn.ModuleList) else [])


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Checkpoint every block in place (names, parameters and state dict keys unchanged)."""
    for block in _blocks(model):
        if type(block) not in _CHECKPOINTED_CLASSES.values():
            block.__class__ = _checkpointed_class(type(block))


def wrap_model(model: nn.Module, dist_info: DistInfo, tcfg: TrainingConfig) -> nn.Module:
    """Activation checkpointing (if asked) + DDP or FSDP2 (when distributed).

    The model must already be on `dist_info.device` and identically initialised on every rank
    (same seed); DDP broadcasts rank 0's weights anyway. Build the optimizer after this call.
    Buffers are synced at construction but not before every forward (``forward_sync_buffers=False``): the only trained
    buffer, the MoE balancing bias, is updated from all-reduced counts on every rank.
    """
    if tcfg.activation_checkpointing:
        apply_activation_checkpointing(model)
    if not dist_info.is_distributed:
        return model
    if tcfg.parallelism == "fsdp":
        mesh = init_device_mesh(dist_info.device.type, (dist_info.world_size,))
        for block in _blocks(model):
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model
    device_ids = [dist_info.device.index] if dist_info.device.type == "cuda" else None
    return DDP(model, device_ids=device_ids, forward_sync_buffers=False)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside DDP and `torch.compile` wrappers (FSDP2 wraps in place)."""
    while True:
        if isinstance(model, DDP):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile's OptimizedModule
            model = model._orig_mod
        else:
            return model


def _is_fsdp(model: nn.Module) -> bool:
    return isinstance(unwrap(model), FSDPModule)


@contextlib.contextmanager
def no_sync_context(model: nn.Module, is_last_microbatch: bool) -> Iterator[None]:
    """Skip the gradient all-reduce / reduce-scatter on all but the last micro-batch of an
    accumulation window (DDP's `no_sync`, FSDP2's `set_requires_gradient_sync`)."""
    ddp = model
    while not isinstance(ddp, DDP) and isinstance(getattr(ddp, "_orig_mod", None), nn.Module):
        ddp = ddp._orig_mod
    if isinstance(ddp, DDP) and not is_last_microbatch:
        with ddp.no_sync():
            yield
        return
    base = unwrap(model)
    if isinstance(base, FSDPModule):
        base.set_requires_gradient_sync(is_last_microbatch)
    yield


# ---------------------------------------------------------------- full state dicts
_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded model state dict on CPU, names without wrapper prefixes.

    Call it on every rank (under FSDP2 it is a collective); under FSDP2 only rank 0 gets the
    tensors (other ranks get an empty dict). Without FSDP2 the CPU tensors may share memory
    with the live parameters: save them before the next optimizer step.
    """
    base = unwrap(model)
    if _is_fsdp(base):
        return get_model_state_dict(base, options=_FULL)
    return {k: v.detach().cpu() for k, v in base.state_dict().items()}


def load_full_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Load an unsharded state dict (strict). Under FSDP2 call it on every rank with the full
    dict; each rank keeps its own shard."""
    base = unwrap(model)
    if _is_fsdp(base):
        set_model_state_dict(base, state_dict, options=StateDictOptions(full_state_dict=True))
    else:
        base.load_state_dict(state_dict)


def full_optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The unsharded optimizer state on CPU, keyed by parameter name:
    ``{"state": {name: {...}}, "param_groups": [{..., "params": [names]}]}``.

    Same format for a single process, DDP and FSDP2, so a checkpoint resumes under any of them.
    Call on every rank; in a distributed run only rank 0 is guaranteed the full dict.
    """
    return get_optimizer_state_dict(unwrap(model), optimizer, options=_FULL)


def load_full_optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Inverse of `full_optimizer_state_dict`; call on every rank with the full dict."""
    set_optimizer_state_dict(unwrap(model), optimizer, state, options=StateDictOptions(full_state_dict=True))


# ---------------------------------------------------------------- collectives (no-ops in one process)
def all_reduce_sum(t: torch.Tensor, group: Optional[dist.ProcessGroup] = None) -> torch.Tensor:
    """Sum `t` over the ranks (of `group`, default all), in place; returns `t`."""
    if _initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Average a floating-point `t` over ranks, in place; returns `t`."""
    if _initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= dist.get_world_size()
    return t


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s (picklable) `obj` on every rank."""
    if not _initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    if _initialized():
        dist.barrier()
