"""What every stage script does around its `Trainer`: join the process group and seed
(`launch`), agree on the run name, create the run directory and start logging (`start_run`),
and leave the process group cleanly.

Under ``torchrun`` each rank loads the config itself, so a ``{timestamp}`` run name could
differ by a second between ranks; rank 0's name is broadcast to all. A timestamped name is a
new directory at every launch, so to resume a run with ``--resume auto`` set
``logging.run_name`` to a fixed name (or pass ``--resume runs/<stage>/<run>``).
"""
from __future__ import annotations

import argparse
import contextlib
import logging
from typing import Iterator, Optional

import torch

from trainer.distributed import (
    DistInfo,
    barrier,
    broadcast_object,
    destroy_distributed,
    init_distributed,
    init_parallel,
)
from utils.checkpoint import list_checkpoints
from utils.config import ExperimentConfig, add_config_args
from utils.device import describe, pick_dtype, seed_everything
from utils.errors import UserError
from utils.runs import RunDir, setup_logging

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def launch(cfg: ExperimentConfig) -> Iterator[DistInfo]:
    """``with launch(cfg) as dist: ...`` — join the process group (under torchrun), seed every
    generator with ``training.seed`` (the same on all ranks, so every rank builds identical
    initial weights, as FSDP2 requires), and leave the group at the end.

    Check the inputs (data, tokenizer) before `start_run`, so a user mistake is one line on
    stderr and leaves no empty run directory.
    """
    dist = init_parallel(init_distributed(cfg.training.device), cfg.training)
    seed_everything(cfg.training.seed)
    if dist.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    yield dist
    # only on success: after an exception the other ranks may be stuck in a collective, and
    # the barrier in `destroy_distributed` would hang instead of letting torchrun stop them
    destroy_distributed()


def start_run(cfg: ExperimentConfig, stage: str, dist: DistInfo, resume: Optional[str] = None) -> RunDir:
    """Agree on the run name, create ``runs/<stage>/<run_name>/`` (rank 0) and start logging.

    A fresh start (`resume` None) refuses a run directory that already holds checkpoints,
    rather than mixing two runs' checkpoints and metrics.
    """
    cfg.logging.run_name = broadcast_object(cfg.logging.run_name)
    run = RunDir(cfg.logging.runs_dir, stage, cfg.logging.run_name, cfg.logging.run_dir)
    if resume is None and list_checkpoints(run.checkpoints):
        key = "logging.run_dir=<new dir>" if cfg.logging.run_dir is not None else "logging.run_name=<new name>"
        raise UserError(f"{run.root} already holds checkpoints: continue it with --resume auto, or start a new "
                        f"run with --set {key}")
    if dist.is_main:
        run.create(cfg)
    barrier()
    setup_logging(run.log_path, dist.rank)
    dtype = pick_dtype(cfg.training.dtype, dist.device)
    logger.info("%s run %s | %s | world_size=%d", stage, run.root, describe(dist.device, dtype), dist.world_size)
    return run


def training_arg_parser(description: str) -> argparse.ArgumentParser:
    """The command line every training stage shares: config + --compile, --resume, --device."""
    parser = argparse.ArgumentParser(description=description)
    add_config_args(parser)
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (falls back with a warning)")
    parser.add_argument("--resume", default=None, metavar="auto|PATH",
                        help="auto: newest checkpoint of this run (needs a fixed logging.run_name); "
                             "or a checkpoint / run directory")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default=None,
                        help="override training.device")
    return parser


def flag_overrides(args: argparse.Namespace) -> list[str]:
    """--set overrides plus those the shared flags stand for."""
    overrides = list(args.overrides)
    if args.compile:
        overrides.append("training.compile=true")
    if args.device:
        overrides.append(f"training.device={args.device}")
    return overrides
