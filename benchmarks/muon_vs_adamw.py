"""Muon vs AdamW: optimizer steps to reach the same validation loss on TinyStories.

A small Llama-style model is trained on the shared TinyStories text (tokenised with a byte-level
BPE trained here in a few seconds with Hugging Face `tokenizers`) from the same initial weights
and the same batches, with

- AdamW at each learning rate of ``--adamw_lrs`` (the best one is kept), then
- Muon (`trainer.optim.Muon`, Jordan et al. 2024) at each ``--muon_lrs`` for the hidden
  matrices, with the embedding / head / norms on AdamW at the best AdamW learning rate.

The schedule is linear warmup then constant (``lr_schedule=constant``), so "the step at which
the validation loss first reaches L" is a property of one trajectory, not of where a decay
ends. Target L = the worse of the two best runs' final validation losses; each optimizer's
steps to reach it are read off its validation curve (linear interpolation between
evaluations). A run whose training loss goes non-finite is marked diverged (``diverged_at_step``,
its final loss reported as null) and never chosen as the best. ``ratio`` = AdamW steps / Muon steps (modded-nanogpt reports ≈ 1.35 for GPT-2
small speedruns; a tiny model on a CPU budget is a much rougher measurement).

    python benchmarks/muon_vs_adamw.py [--quick] [--steps 250] [--threads N] [--device auto] [--out results.json]

Prints one JSON object. Needs the shared data (env LLM_DATA_DIR or ../shared/data).
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from model import ModelConfig, build_model
from trainer.optim import build_optimizer, set_lr
from trainer.schedule import lr_multiplier
from utils.config import TrainingConfig
from utils.device import autocast_context, pick_device, pick_dtype
from utils.errors import UserError, cli_main
from utils.paths import shared_data_dir

EOS = "<|endoftext|>"
TRAIN_FILE = "tinystories/tinystories_v1_train_first2MiB.txt"
VAL_FILE = "tinystories/tinystories_v1_valid_head.txt"


# ---------------------------------------------------------------- data
def read_data() -> tuple[str, str]:
    root = shared_data_dir()
    if root is None:
        raise UserError("shared TinyStories data not found: set LLM_DATA_DIR or place it at ../shared/data")
    paths = [root / TRAIN_FILE, root / VAL_FILE]
    for p in paths:
        if not p.is_file():
            raise UserError(f"missing {p}")
    return paths[0].read_text(encoding="utf-8"), paths[1].read_text(encoding="utf-8")


def tokenize(train_text: str, val_text: str, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Byte-level BPE trained on the training text; stories joined by EOS. → 1-D int64 streams."""
    from tokenizers import ByteLevelBPETokenizer

    train_docs = [d.strip() for d in train_text.split(EOS) if d.strip()]
    val_docs = [d.strip() for d in val_text.split("\n\n") if d.strip()]  # the val head has no EOS markers
    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator(train_docs, vocab_size=vocab_size, special_tokens=[EOS], show_progress=False)
    eos = tok.token_to_id(EOS)

    def stream(docs: list[str]) -> torch.Tensor:
        ids: list[int] = []
        for enc in tok.encode_batch(docs):
            ids.extend(enc.ids)
            ids.append(eos)
        return torch.tensor(ids, dtype=torch.long)

    return stream(train_docs), stream(val_docs)


def batch_at(stream: torch.Tensor, starts: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Windows of seq_len + 1 tokens at `starts` → (B, seq_len + 1)."""
    return torch.stack([stream[s:s + seq_len + 1] for s in starts.tolist()])


# ---------------------------------------------------------------- training
def evaluate(model: torch.nn.Module, val: torch.Tensor, device, dtype) -> float:
    model.eval()
    with torch.no_grad(), autocast_context(device, dtype):
        logits = model(val[:, :-1].to(device))
        loss = F.cross_entropy(logits.float().flatten(0, 1), val[:, 1:].flatten().to(device))
    model.train()
    return loss.item()


def train_run(cfg: ModelConfig, init: dict, tcfg: TrainingConfig, batches: list[torch.Tensor], val: torch.Tensor,
              eval_every: int, device, dtype) -> dict:
    """One run from the shared initial weights; returns its validation curve. A run whose
    training loss goes non-finite stops there and is marked ``diverged_at`` (that step)."""
    model = build_model(cfg, device)
    model.load_state_dict(init)
    opt = build_optimizer(model, tcfg)
    curve = [(0, evaluate(model, val, device, dtype))]
    diverged_at: Optional[int] = None
    t0 = time.perf_counter()
    for step, batch in enumerate(batches):
        set_lr(opt, lr_multiplier(step, tcfg))
        batch = batch.to(device)
        with autocast_context(device, dtype):
            logits = model(batch[:, :-1])
            loss = F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())
        if not math.isfinite(loss.item()):
            diverged_at = step + 1
            break
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if (step + 1) % eval_every == 0 or step + 1 == len(batches):
            curve.append((step + 1, evaluate(model, val, device, dtype)))
    return {"curve": curve, "final_val_loss": curve[-1][1], "diverged_at": diverged_at,
            "seconds": time.perf_counter() - t0}


def diverged(run: dict) -> bool:
    """Whether a run diverged: its training loss went non-finite (it stopped early, so its last
    validation loss is from before the blow-up and means nothing) or its last validation loss
    is not finite."""
    return run.get("diverged_at") is not None or not math.isfinite(run["final_val_loss"])


def best_lr(runs: dict[float, dict], name: str) -> float:
    """The learning rate of the lowest final validation loss among the runs that did not diverge."""
    healthy = {lr: r for lr, r in runs.items() if not diverged(r)}
    if not healthy:
        raise RuntimeError(f"every {name} run diverged")
    return min(healthy, key=lambda lr: healthy[lr]["final_val_loss"])


def final_losses(runs: dict[str, dict]) -> dict[str, Optional[float]]:
    """Final validation loss per learning rate for the report; None for a diverged run."""
    return {lr: None if diverged(r) else r["final_val_loss"] for lr, r in runs.items()}


def steps_to_reach(curve: list[tuple[int, float]], target: float) -> Optional[float]:
    """First step at which the (linearly interpolated) validation curve is <= target."""
    for (s0, l0), (s1, l1) in zip(curve, curve[1:]):
        if l1 <= target:
            if l0 <= target:
                return float(s0)
            return s0 + (s1 - s0) * (l0 - target) / (l0 - l1)
    return None


def sweep(name: str, lrs: list[float], make_tcfg, cfg, init, batches, val, eval_every, device, dtype) -> dict:
    runs = {}
    for lr in lrs:
        runs[lr] = train_run(cfg, init, make_tcfg(lr), batches, val, eval_every, device, dtype)
    return {"best_lr": best_lr(runs, name), "runs": {str(lr): r for lr, r in runs.items()}}


def main() -> None:
    p = argparse.ArgumentParser(description="Steps for Muon vs AdamW to reach the same validation loss.")
    p.add_argument("--quick", action="store_true", help="a short smoke run")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 250, quick 30)")
    p.add_argument("--adamw_lrs", default="1e-3,3e-3,1e-2")
    p.add_argument("--muon_lrs", default="0.005,0.01,0.02")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    p.add_argument("--out", default=None, help="also write the JSON here")
    args = p.parse_args()
    try:
        adamw_lrs = [float(x) for x in args.adamw_lrs.split(",")]
        muon_lrs = [float(x) for x in args.muon_lrs.split(",")]
    except ValueError:
        raise UserError("--adamw_lrs / --muon_lrs must be comma-separated numbers") from None
    steps = args.steps or (30 if args.quick else 250)
    if steps < 2:
        raise UserError(f"--steps must be >= 2, got {steps}")
    eval_every = 10 if args.quick else 20
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    dtype = pick_dtype("auto", device)
    seq_len, batch_size, vocab = 128, 8, 2048
    cfg = ModelConfig(vocab_size=vocab, dim=128, n_layers=4, n_heads=4, ffn_hidden_dim=344, max_seq_len=seq_len)

    t0 = time.perf_counter()
    train_text, val_text = read_data()
    train_ids, val_ids = tokenize(train_text, val_text, vocab)
    gen = torch.Generator().manual_seed(args.seed)
    last_start = len(train_ids) - seq_len - 1
    batches = [batch_at(train_ids, torch.randint(0, last_start, (batch_size,), generator=gen), seq_len)
               for _ in range(steps)]
    n_val = 16 if args.quick else 64
    val_starts = torch.arange(n_val) * ((len(val_ids) - seq_len - 1) // n_val)
    val = batch_at(val_ids, val_starts, seq_len)
    torch.manual_seed(args.seed)
    init = build_model(cfg, device).state_dict()
    prep_s = time.perf_counter() - t0

    def tcfg(optimizer: str, lr: float, muon_lr: float = 0.02) -> TrainingConfig:
        return TrainingConfig(optimizer=optimizer, learning_rate=lr, muon_learning_rate=muon_lr, weight_decay=0.0,
                              lr_schedule="constant", warmup_steps=max(1, steps // 20), max_steps=steps, grad_clip=1.0)

    common = (cfg, init, batches, val, eval_every, device, dtype)
    adamw = sweep("adamw", adamw_lrs, lambda lr: tcfg("adamw", lr), *common)
    muon = sweep("muon", muon_lrs, lambda lr: tcfg("muon", adamw["best_lr"], lr), *common)
    best_a = adamw["runs"][str(adamw["best_lr"])]
    best_m = muon["runs"][str(muon["best_lr"])]
    target = max(best_a["final_val_loss"], best_m["final_val_loss"])
    steps_a, steps_m = steps_to_reach(best_a["curve"], target), steps_to_reach(best_m["curve"], target)
    result = {
        "benchmark": "muon_vs_adamw", "device": str(device), "dtype": str(dtype).removeprefix("torch."),
        "quick": args.quick, "steps_per_run": steps, "tokens_per_step": batch_size * seq_len,
        "model": {"vocab_size": vocab, "dim": cfg.dim, "n_layers": cfg.n_layers, "seq_len": seq_len},
        "data": {"train_tokens": len(train_ids), "val_tokens_used": int(val.numel())},
        "adamw": {"best_lr": adamw["best_lr"], "final_val_loss": final_losses(adamw["runs"]),
                  "diverged_at_step": {lr: r["diverged_at"] for lr, r in adamw["runs"].items() if diverged(r)}},
        "muon": {"best_muon_lr": muon["best_lr"], "adamw_lr_for_embeddings_head_norms": adamw["best_lr"],
                 "final_val_loss": final_losses(muon["runs"]),
                 "diverged_at_step": {lr: r["diverged_at"] for lr, r in muon["runs"].items() if diverged(r)}},
        "target_val_loss": target,
        "steps_to_target": {"adamw": steps_a, "muon": steps_m},
        "ratio_adamw_over_muon_steps": (steps_a / steps_m) if steps_a and steps_m else None,
        "curves": {"adamw": best_a["curve"], "muon": best_m["curve"]},
        "seconds": {"prep": prep_s, "total": time.perf_counter() - t0},
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    cli_main(main)
