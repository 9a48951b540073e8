"""Resumable training checkpoints on top of `utils.checkpoint`'s atomic directory format.

A training checkpoint is ``<run>/checkpoints/step_NNNNNNNN/`` holding the full model weights
(``model.safetensors``, loadable for inference, tokenizer files beside them) and
``training_state/`` with everything else an exact resume needs:

    step, tokens_seen         how far training got
    optimizer                 full (unsharded) optimizer state, keyed by parameter name
    grad_scaler               fp16 loss-scale state (None otherwise)
    spike_guard               loss history, counters, LR scale after rollbacks
    checkpoints               best validation loss so far and its step
    ranks[r]                  per rank: RNG states (python / numpy / torch / cuda) and the
                              data loader's position
    world_size

The learning-rate schedule is a pure function of the step, so "scheduler state" is `step`.
Writes are atomic (temp dir + rename), so a crash or SIGKILL at any moment — including in the
middle of a save — leaves the previous checkpoint loadable. `CheckpointManager` keeps the
newest `keep_last` checkpoints plus the best one: the lowest validation loss among the
checkpoints saved at a step that was also validated (the last step always is).

Model and optimizer state are gathered unsharded and keyed by parameter name
(`trainer.distributed.full_state_dict` / `full_optimizer_state_dict`), so single-process,
DDP and FSDP runs share one format (a run saved by FSDP on N ranks resumes in one process).
Under pipeline parallelism each stage contributes its parameters and optimizer state and rank 0
writes them merged, in the same format; on resume each stage takes its part.
Multi-node runs need the run directory on a shared filesystem: every rank reads it.
"""
from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as torch_dist
from torch import nn

from model.config import ModelConfig
from trainer.distributed import (
    barrier,
    full_optimizer_state_dict,
    full_state_dict,
    load_full_optimizer_state_dict,
    load_full_state_dict,
)
from trainer.pipeline import gather_full_optimizer_state, gather_full_state, split_optimizer_state
from utils.checkpoint import (
    is_checkpoint,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
    step_dir,
)
from utils.device import get_rng_state, set_rng_state
from utils.errors import UserError

logger = logging.getLogger(__name__)

FINAL_NAME = "final"


def resolve_resume(resume: Optional[str], checkpoints_root: Path) -> Optional[Path]:
    """``--resume`` → the checkpoint directory to resume from, or None to start fresh.

    ``auto``: the newest resumable checkpoint of this run (None when there is none yet — the
    run name must be fixed, not ``{timestamp}``, for a restart to find its own run). A path:
    a checkpoint directory, or a run directory / its ``checkpoints/`` (its newest one).
    """
    if resume is None:
        return None
    if resume == "auto":
        return latest_checkpoint(checkpoints_root)
    path = Path(resume).expanduser().resolve()
    if not path.exists():
        raise UserError(f"--resume {resume}: no such checkpoint or run directory")
    if is_checkpoint(path):
        if not (path / "training_state" / "state.json").is_file():
            raise UserError(f"--resume {resume}: this checkpoint holds weights only (no training_state/); "
                            "start from it with checkpointing.init_from instead")
        return path
    for root in (path / "checkpoints", path):
        found = latest_checkpoint(root)
        if found is not None:
            return found
    raise UserError(f"--resume {resume}: no resumable checkpoint (step_NNNNNNNN/ with training_state/) found there")


class CheckpointManager:
    """Writes step checkpoints (rank 0 only), prunes old ones, remembers the best."""

    def __init__(self, root: Path, keep_last: int, keep_best: bool, is_writer: bool) -> None:
        self.root = Path(root)
        self.keep_last = keep_last
        self.keep_best = keep_best
        self.is_writer = is_writer
        self.best_loss: Optional[float] = None  # of the saved checkpoints
        self.best_step: Optional[int] = None
        self.best_seen: Optional[float] = None  # of every validation, saved or not

    def clean_stale(self) -> None:
        """Remove what a crash during a save or a prune left behind (never a complete checkpoint)."""
        if not (self.is_writer and self.root.is_dir()):
            return
        for pattern in (".tmp-*", ".del-*"):
            for p in self.root.glob(pattern):
                shutil.rmtree(p, ignore_errors=True)

    def is_best(self, loss: float) -> bool:
        """Whether a validation loss beats every saved checkpoint's so far."""
        return self.best_loss is None or loss < self.best_loss

    def note_validation(self, loss: float) -> bool:
        """Whether a validation loss beats every earlier validation's (what the log calls best)."""
        best = self.best_seen is None or loss < self.best_seen
        if best:
            self.best_seen = loss
        return best

    def consider_best(self, step: int, val_loss: float) -> None:
        """Before saving step `step`, validated at that very step: is it the best checkpoint?"""
        if self.is_best(val_loss):
            self.best_loss, self.best_step = val_loss, step

    def save(self, step: int, model_state: dict[str, torch.Tensor], model_config: dict, training_state: dict,
             meta: dict, tokenizer_dir: Optional[Path]) -> Optional[Path]:
        """Write ``step_NNNNNNNN`` atomically, then prune. Returns its path (None on other ranks)."""
        if not self.is_writer:
            return None
        path = save_checkpoint(step_dir(self.root, step), model_state, model_config,
                               tokenizer_dir=tokenizer_dir, training_state=training_state, meta=meta)
        self.prune()
        return path

    def save_final(self, model_state: dict[str, torch.Tensor], model_config: dict, meta: dict,
                   tokenizer_dir: Optional[Path]) -> Optional[Path]:
        """``checkpoints/final``: weights + config + tokenizer, what inference loads."""
        if not self.is_writer:
            return None
        return save_checkpoint(self.root / FINAL_NAME, model_state, model_config, tokenizer_dir=tokenizer_dir, meta=meta)

    def prune(self) -> None:
        """Delete all but the newest `keep_last` step checkpoints (and the best one)."""
        ckpts = list_checkpoints(self.root)
        keep = set(ckpts[-self.keep_last:])
        if self.keep_best and self.best_step is not None:
            keep.add(step_dir(self.root, self.best_step))
        for p in ckpts:
            if p not in keep:
                _remove_checkpoint(p)

    def discard_after(self, step: int) -> list[Path]:
        """Delete the step checkpoints newer than `step` (a spike-guard rollback to `step`): they
        hold the diverging stretch, and would otherwise outrank the rolled-back run's own
        checkpoints in `--resume auto` and in pruning. Returns what was deleted (rank 0)."""
        if not self.is_writer:
            return []
        doomed = [p for p in list_checkpoints(self.root) if checkpoint_step(p) > step]
        for p in doomed:
            _remove_checkpoint(p)
        return doomed

    def newest_before(self, step: int) -> Optional[Path]:
        """The newest resumable checkpoint whose step is <= `step` (rollback target)."""
        for p in reversed(list_checkpoints(self.root)):
            if checkpoint_step(p) <= step and (p / "training_state" / "state.json").is_file():
                return p
        return None

    def state_dict(self) -> dict[str, Any]:
        return {"best_loss": self.best_loss, "best_step": self.best_step, "best_seen": self.best_seen}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best_loss = state.get("best_loss")
        self.best_step = state.get("best_step")
        self.best_seen = state.get("best_seen", self.best_loss)


def checkpoint_step(path: Path) -> int:
    """The step of a ``step_NNNNNNNN`` checkpoint directory."""
    return int(path.name[len("step_"):])


def _remove_checkpoint(path: Path) -> None:
    """Rename first, then delete: a crash mid-delete leaves no half checkpoint under a step name."""
    doomed = path.with_name(f".del-{path.name}")
    os.rename(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


# ---------------------------------------------------------------------------- trainer state
def gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order (a one-element list in a single process)."""
    if not (torch_dist.is_available() and torch_dist.is_initialized()):
        return [obj]
    out: list[Any] = [None] * torch_dist.get_world_size()
    torch_dist.all_gather_object(out, obj)
    return out


def check_model_config(saved: dict, current: ModelConfig, path: Path) -> None:
    """Refuse weights trained with another architecture (one line naming the differences)."""
    now = current.model_dump(mode="json")
    diff = [k for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)]
    if diff:
        shown = ", ".join(f"{k}: saved {saved.get(k)!r} vs config {now.get(k)!r}" for k in diff[:4])
        more = f" (+{len(diff) - 4} more)" if len(diff) > 4 else ""
        raise UserError(f"checkpoint {path} has another model config than `model:` ({shown}{more})")


def init_from_checkpoint(model: nn.Module, path: Path, model_cfg: ModelConfig) -> None:
    """Start from the weights of a checkpoint (``checkpointing.init_from``), before wrapping."""
    ckpt = load_checkpoint(path)
    check_model_config(ckpt.model_config, model_cfg, path)
    model.load_state_dict(ckpt.state_dict)


def _meta(trainer: Any) -> dict:
    return {
        "stage": trainer.stage, "step": trainer.step, "tokens_seen": trainer.tokens_seen,
        "train_loss": trainer.losses[-1][1] if trainer.losses else None, "val": trainer.last_val,
        "best_val_loss": trainer.ckpt.best_loss, "best_step": trainer.ckpt.best_step,
        "config": trainer.cfg.model_dump(mode="json"),
    }


def _full_model_state(trainer: Any) -> dict[str, torch.Tensor]:
    """The whole model's state dict (rank 0): pipeline stages each save theirs, merged."""
    state = full_state_dict(trainer.model)
    if getattr(trainer, "pipeline", None) is not None:
        state = gather_full_state(state, trainer.dist.group("pp"))
    return state


def _full_optimizer_state(trainer: Any) -> dict:
    """The whole optimizer state keyed by parameter name (rank 0), pipeline stages merged."""
    if getattr(trainer, "pipeline", None) is not None:
        return gather_full_optimizer_state(trainer.model, trainer.optimizer, trainer.dist.group("pp"),
                                           trainer.optimizer_layout)
    return full_optimizer_state_dict(trainer.model, trainer.optimizer)


def save_training_checkpoint(trainer: Any, final: bool = False) -> Optional[Path]:
    """Gather the `Trainer`'s state on every rank and write it from rank 0.

    ``final=True`` writes ``checkpoints/final`` (weights + tokenizer, no training state).
    """
    model_state = _full_model_state(trainer)
    model_config = {**trainer.cfg.model.model_dump(mode="json"), **getattr(trainer, "checkpoint_config", {})}
    if final:
        model_state = trainer.final_weights(model_state) if hasattr(trainer, "final_weights") else model_state
        path = trainer.ckpt.save_final(model_state, model_config, _meta(trainer), trainer.tokenizer_dir)
        barrier()
        return path
    if trainer.last_val is not None and trainer.last_val_step == trainer.step:
        trainer.ckpt.consider_best(trainer.step, trainer.last_val["val_loss"])
    data_state = getattr(trainer.train_data, "state_dict", None)
    state = {
        "step": trainer.step,
        "tokens_seen": trainer.tokens_seen,
        "optimizer": _full_optimizer_state(trainer),
        "grad_scaler": trainer.scaler.state_dict() if trainer.scaler.is_enabled() else None,
        "spike_guard": trainer.guard.state_dict(),
        "checkpoints": trainer.ckpt.state_dict(),
        "world_size": trainer.dist.world_size,
        "ranks": gather_objects({"rng": get_rng_state(), "data": data_state() if data_state else None}),
    }
    path = trainer.ckpt.save(trainer.step, model_state, model_config, state, _meta(trainer), trainer.tokenizer_dir)
    barrier()
    return path


def load_training_checkpoint(trainer: Any, path: Path, restore_data: bool) -> None:
    """Restore a `Trainer` from a checkpoint on every rank.

    ``restore_data=True`` (resume): also the RNG states, data position and spike-guard
    record. ``False`` (spike-guard rollback): weights, optimizer, loss scale, step and the
    best-checkpoint record only — the data stream goes on past the batches that caused the
    trouble (the engine deletes the checkpoints newer than the target).
    Hyper-parameters of the param groups (``base_lr``, weight decay, betas) keep their values
    from the current config, so a resumed run may change them.
    """
    ckpt = load_checkpoint(path, load_training_state=True)
    check_model_config(ckpt.model_config, trainer.cfg.model, path)
    ts = ckpt.training_state
    model_state, optimizer_state = ckpt.state_dict, ts["optimizer"]
    if getattr(trainer, "pipeline", None) is not None:  # this rank's stages take their part
        names = set(trainer.model.state_dict())
        model_state = {k: v for k, v in model_state.items() if k in names}
        optimizer_state = split_optimizer_state(optimizer_state, names)
    load_full_state_dict(trainer.model, model_state)
    fresh = [{k: v for k, v in g.items() if k != "params"} for g in trainer.optimizer.param_groups]
    load_full_optimizer_state_dict(trainer.model, trainer.optimizer, optimizer_state)
    for group, hyper in zip(trainer.optimizer.param_groups, fresh):
        group.update(hyper)
    if trainer.scaler.is_enabled() and ts["grad_scaler"]:
        trainer.scaler.load_state_dict(ts["grad_scaler"])
    trainer.step = int(ts["step"])
    trainer.tokens_seen = int(ts["tokens_seen"])
    trainer.ckpt.load_state_dict(ts["checkpoints"])  # a rollback discards the newer checkpoints
    if not restore_data:
        return
    trainer.guard.load_state_dict(ts["spike_guard"])
    ranks, rank = ts["ranks"], trainer.dist.rank
    if len(ranks) != trainer.dist.world_size:
        logger.warning("checkpoint was saved by %d ranks, now %d: random streams restart from rank 0's "
                       "(the data position is kept; the run is not bitwise identical)", len(ranks), trainer.dist.world_size)
    mine = ranks[rank] if len(ranks) == trainer.dist.world_size else ranks[0]
    set_rng_state(mine["rng"])
    if mine["data"] is not None and hasattr(trainer.train_data, "load_state_dict"):
        trainer.train_data.load_state_dict(mine["data"])
    else:
        logger.warning("the training data has no saved position: it restarts from its beginning")
