"""Pretraining: next-token prediction on the flat token stream of ``<data_dir>/pretrain/``.

    python pretrain/train.py --config_path configs/pretrain/tiny.yaml [--compile]
        [--set key=value ...] [--resume auto|PATH] [--print_config] [--device cpu|cuda|mps]
    torchrun --nproc_per_node=N pretrain/train.py --config_path ...

The stage is data + loss, handed to the one engine (`trainer.engine.Trainer`):
`data_pipeline.loader.PretrainLoader` windows (optionally with document masking) and
`trainer.losses.causal_lm_loss` (cross-entropy, + multi-token prediction and the MoE balance
loss when the model has them). Output: ``runs/pretrain/<run_name>/`` with config.yaml,
train.log, metrics.jsonl, loss.png and checkpoints/ (``step_NNNNNNNN`` resumable,
``final`` for inference, each with the tokenizer files).
"""
from __future__ import annotations

import itertools
import logging
from pathlib import Path
from typing import Any, Optional

import torch

from data_pipeline.formats import bin_base
from data_pipeline.tokenizer.io import required_tokenizer_hash
from data_pipeline.loader import PretrainLoader
from model import build_model, count_params, flops_per_token
from trainer.checkpointing import init_from_checkpoint
from trainer.engine import Trainer
from trainer.evaluation import TextSampler
from trainer.launch import flag_overrides, launch, start_run, training_arg_parser
from trainer.losses import causal_lm_loss
from utils.config import ExperimentConfig, config_from_args
from utils.errors import UserError, cli_main

STAGE = "pretrain"
logger = logging.getLogger(__name__)


def build_loaders(cfg: ExperimentConfig, rank: int, world_size: int, tok_hash: Optional[str]):
    """Training loader and a factory for the (unshuffled, rank-sharded) validation batches."""
    seq_len = cfg.data.seq_len or cfg.model.max_seq_len
    if seq_len > cfg.model.max_seq_len:
        raise UserError(f"data.seq_len={seq_len} exceeds model.max_seq_len={cfg.model.max_seq_len}")
    common = dict(seq_len=seq_len, batch_size=cfg.training.batch_size, rank=rank, world_size=world_size,
                  seed=cfg.training.seed, doc_masking=cfg.data.doc_masking, vocab_size=cfg.model.vocab_size,
                  tokenizer_hash=tok_hash)
    train = PretrainLoader(bin_base(cfg.data.train_path()), shuffle=True, **common)
    val = PretrainLoader(bin_base(cfg.data.val_path()), shuffle=False, **common)
    if val.steps_per_epoch() == 0:
        raise UserError(f"{cfg.data.val_path()} is too small for one validation batch of "
                        f"{cfg.training.batch_size} x {world_size} windows of {seq_len + 1} tokens")
    start = val.state_dict()

    def val_batches():
        val.load_state_dict(start)  # the same batches at every evaluation, none twice
        return itertools.islice(val, val.steps_per_epoch())

    return train, val_batches, seq_len


def train(cfg: ExperimentConfig, resume: Optional[str] = None, stop_at: Optional[int] = None) -> dict[str, Any]:
    """Run (or resume) one pretraining run; returns the engine's summary.

    ``stop_at``: end after that step with a resumable checkpoint (see `Trainer.fit`).
    """
    with launch(cfg) as dist:
        tokenizer_dir = cfg.data.tokenizer_path()
        tok_hash = required_tokenizer_hash(tokenizer_dir)
        train_data, val_data, seq_len = build_loaders(cfg, dist.dp_rank, dist.dp_size, tok_hash)
        run = start_run(cfg, STAGE, dist, resume)
        model = build_model(cfg.model, dist.device, torch.float32)  # fp32 master weights; AMP computes
        if cfg.checkpointing.init_from is not None:
            init_from_checkpoint(model, cfg.checkpointing.init_from, cfg.model)
        params = count_params(model)
        logger.info("model: %.2fM parameters (%.2fM active per token)", params["total"] / 1e6, params["active"] / 1e6)
        lcfg = cfg.logging
        sampler = (TextSampler(tokenizer_dir, lcfg.sample_prompt, lcfg.sample_tokens, lcfg.sample_top_k,
                               cfg.training.seed) if lcfg.sample_interval > 0 else None)
        trainer = Trainer(cfg, model, causal_lm_loss, train_data, run, dist, stage=STAGE, val_data=val_data,
                          tokenizer_dir=tokenizer_dir, sampler=sampler,
                          flops_per_token=flops_per_token(cfg.model, seq_len))
        trainer.resume(resume)
        return trainer.fit(stop_at=stop_at)


def main() -> None:
    args = training_arg_parser("Pretrain a language model (next-token prediction).").parse_args()
    args.overrides = flag_overrides(args)
    cfg = config_from_args(args, ExperimentConfig)
    train(cfg, resume=args.resume)


if __name__ == "__main__":
    cli_main(main)
