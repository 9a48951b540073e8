"""A few optimizer steps of a tiny model with `trainer.distributed` + `trainer.optim`, for
tests/test_distributed.py. Run it under torchrun (N ranks) or call `run` in one process: the
same global batch (`global_batch` rows per step, split over ranks and micro-batches) must give
the same losses.

    python -m torch.distributed.run --nproc_per_node=2 tests/dist_scripts/train_tiny.py \
        --out DIR [--parallelism ddp|fsdp] [--optimizer adamw|muon] [--preset tiny] ...

Writes (rank 0) ``DIR/result.json`` (losses, MoE balancing biases and expert counts, probe
logits), ``DIR/model.safetensors`` (`full_state_dict`) and ``DIR/optim.pt``
(`full_optimizer_state_dict`, saved with torch.save; tensors only, read with weights_only).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from model import build_model, get_preset
from model.moe import moe_modules, update_moe_biases
from trainer.distributed import (
    DistInfo,
    all_reduce_mean,
    destroy_distributed,
    full_optimizer_state_dict,
    full_state_dict,
    init_distributed,
    no_sync_context,
    unwrap,
    wrap_model,
)
from trainer.optim import build_optimizer, set_lr
from trainer.schedule import lr_multiplier
from utils.config import TrainingConfig


def batches(steps: int, global_batch: int, seq_len: int, vocab: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1234)
    return [torch.randint(0, vocab, (global_batch, seq_len + 1), generator=gen) for _ in range(steps)]


def run(dist_info: DistInfo, args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    overrides = {"mtp_depth": 0} if args.preset == "tiny-deepseek_v3" else {}
    cfg = get_preset(args.preset, **overrides)
    model = build_model(cfg, dist_info.device)
    tcfg = TrainingConfig(optimizer=args.optimizer, parallelism=args.parallelism, learning_rate=3e-3,
                          warmup_steps=2, max_steps=args.steps, activation_checkpointing=args.activation_checkpointing)
    model = wrap_model(model, dist_info, tcfg)
    opt = build_optimizer(model, tcfg)
    per_rank = args.global_batch // dist_info.world_size
    micro = per_rank // args.grad_accum
    losses = []
    for step, batch in enumerate(batches(args.steps, args.global_batch, args.seq_len, cfg.vocab_size)):
        set_lr(opt, lr_multiplier(step, tcfg))
        mine = batch[dist_info.rank * per_rank:(dist_info.rank + 1) * per_rank].to(dist_info.device)
        total = torch.zeros((), device=dist_info.device)
        for i in range(args.grad_accum):
            chunk = mine[i * micro:(i + 1) * micro]  # (micro, T + 1)
            with no_sync_context(model, is_last_microbatch=i == args.grad_accum - 1):
                logits = model(chunk[:, :-1])  # (micro, T, V)
                loss = F.cross_entropy(logits.flatten(0, 1), chunk[:, 1:].flatten()) / args.grad_accum
                loss.backward()
            total += loss.detach()
        opt.step()
        opt.zero_grad(set_to_none=True)
        update_moe_biases(model)
        losses.append(all_reduce_mean(total).item())

    probe = batches(1, 2, args.seq_len, cfg.vocab_size)[0][:, :-1].to(dist_info.device)
    model.eval()
    with torch.no_grad():
        probe_logits = model(probe).float().cpu()
    moe = {name: {"bias": m.gate.e_score_correction_bias.float().cpu().tolist(),
                  "counts": m.last_tokens_per_expert.tolist()} for name, m in moe_modules(unwrap(model))}
    state = full_state_dict(model)
    optim_state = full_optimizer_state_dict(model, opt)
    result = {"losses": losses, "moe": moe, "probe_logits": probe_logits.tolist(), "world_size": dist_info.world_size}
    if dist_info.is_main and args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in state.items()}, str(out / "model.safetensors"))
        torch.save(optim_state, out / "optim.pt")
        (out / "result.json").write_text(json.dumps(result))
    return result


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=None)
    p.add_argument("--parallelism", choices=["ddp", "fsdp"], default="ddp")
    p.add_argument("--optimizer", choices=["adamw", "muon"], default="adamw")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--global_batch", type=int, default=8)
    p.add_argument("--grad_accum", type=int, default=1)
    p.add_argument("--seq_len", type=int, default=16)
    p.add_argument("--activation_checkpointing", action="store_true")
    return p


if __name__ == "__main__":
    cli_args = parser().parse_args()
    info = init_distributed("cpu")
    torch.set_num_threads(1)
    run(info, cli_args)
    destroy_distributed()
