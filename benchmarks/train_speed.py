"""Pretraining step speed of our models vs Hugging Face `transformers` (Llama, DeepSeek-V3).

One step = forward + cross-entropy + backward + AdamW step, on the same config, the same
weights (copied through `model.hf.state_dict_to_hf`), the same random batch and the same
optimizer (`trainer.optim.build_optimizer`, AdamW: fused on CPU and CUDA). Each side
computes the loss as its own training does: ours through the trainer's `causal_lm_loss` (head
and cross-entropy fused, `model.linear_ce`), transformers' from its (B, T, V) logits.
Hugging Face runs with ``attn_implementation="sdpa"``. Both run eager and compiled: ours as
``training.compile`` compiles it (`trainer.compile.compile_blocks`: block by block, the MoE
dispatch eager), Hugging Face's whole model under `torch.compile` (no numbers, with a warning,
where compile fails).

MFU = achieved model FLOPs / peak, with the model FLOPs from `model.flops_per_token`
(6 N + attention, Kaplan et al. 2020 / PaLM appendix B; N = active parameters for a MoE) and the peak of the trainer's one
definition (`trainer.metrics.peak_flops`: the datasheet for a known GPU in bf16/fp16, else a
measured large matmul in the compute dtype), named in ``mfu_peak_source``.

Configs (the `bench-A` / `bench-B` / `bench-D` presets):
    A: vocab 4096, dim 256, 4 layers, 8 heads, 4 kv heads, ffn 688, seq 256, batch 8
    B: vocab 8192, dim 512, 8 layers, 8 heads, 8 kv heads, ffn 1376, seq 512, batch 4
    D: DeepSeek-V3 (`DeepseekV3ForCausalLM`): vocab 4096, dim 256, 4 layers, 8 heads, MLA with
       kv_lora_rank 64, q_lora_rank 128, rope/nope/v head dims 16/32/32; 8 routed experts top-2
       + 1 shared, expert ffn 128, dense ffn 688 in the first layer, 1 group; seq 256, batch 8.
       The reference runs twice: ``hf`` with transformers' ``grouped_mm`` experts and
       ``hf_eager`` with its per-expert loop.

    python benchmarks/train_speed.py [--quick] [--configs A,B,D] [--modes eager,compiled]
        [--device auto|cpu|cuda|mps] [--out results.json]

Prints one JSON object; ``ratio`` is ours / Hugging Face tokens per second (> 1: we are faster;
for D against ``grouped_mm``, ``ratio_vs_hf_eager`` against the loop).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path
from typing import Callable

if __package__ in (None, ""):  # run as a script: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks.hf_twin import hf_twin  # noqa: E402
from model import build_model, flops_per_token, get_preset  # noqa: E402
from trainer.compile import compile_blocks  # noqa: E402
from trainer.losses import causal_lm_loss  # noqa: E402
from trainer.metrics import mfu, peak_flops  # noqa: E402
from trainer.optim import build_optimizer  # noqa: E402
from utils.config import TrainingConfig  # noqa: E402
from utils.device import autocast_context, pick_device, pick_dtype  # noqa: E402
from utils.errors import UserError, cli_main  # noqa: E402

CONFIGS = {"A": ("bench-A", 256, 8), "B": ("bench-B", 512, 4), "D": ("bench-D", 256, 8)}  # preset, seq_len, batch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
    elif device.type == "mps":
        torch.mps.synchronize()


def logits_loss(forward: Callable) -> Callable:
    """Mean next-token cross-entropy of ``forward(inputs)``'s logits (B, T, V): how a
    `transformers` model is trained (its ``labels=`` loss is this, in fp32)."""
    def loss_fn(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = forward(inputs)  # (B, T, V)
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
    return loss_fn


def trainer_loss(model: nn.Module) -> Callable:
    """Our pretraining loss as the trainer computes it (`trainer.losses.causal_lm_loss`: the head
    and cross-entropy fused chunk by chunk, no (B, T, V) logits), as a mean."""
    def loss_fn(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        out = causal_lm_loss(model, {"input_ids": inputs, "labels": targets})
        return out.loss_sum / out.n_tokens
    return loss_fn


def make_step(model: nn.Module, loss_fn: Callable, device: torch.device, dtype: torch.dtype, tokens: torch.Tensor):
    """A closure running one training step (``loss_fn(inputs, targets)`` → mean loss, backward,
    AdamW step); returns the loss (a tensor)."""
    opt = build_optimizer(model, TrainingConfig(optimizer="adamw", learning_rate=1e-4, weight_decay=0.1))
    inputs, targets = tokens[:, :-1], tokens[:, 1:]

    def step() -> torch.Tensor:
        with autocast_context(device, dtype):
            loss = loss_fn(inputs, targets)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def time_interleaved(steps: dict[str, Callable], device: torch.device, warmup: int, iters: int) -> dict[str, float]:
    """Median seconds per step of each closure. The closures take turns step by step, so a
    noisy (shared) machine slows them alike instead of biasing the ratio."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    sync(device)
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(iters):
        for label, step in steps.items():
            t0 = time.perf_counter()
            step()
            sync(device)
            times[label].append(time.perf_counter() - t0)
    return {k: sorted(v)[len(v) // 2] for k, v in times.items()}


def bench_config(name: str, modes: list[str], device: torch.device, dtype: torch.dtype, warmup: int,
                 iters: int) -> dict:
    preset, seq_len, batch = CONFIGS[name]
    cfg = get_preset(preset)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq_len + 1), generator=gen).to(device)
    tokens_per_step = batch * seq_len
    out: dict = {"preset": preset, "seq_len": seq_len, "batch": batch, "tokens_per_step": tokens_per_step,
                 "model_tflops_per_step": flops_per_token(cfg, seq_len) * tokens_per_step / 1e12}

    torch.manual_seed(0)
    ours = build_model(cfg, device)
    ref = hf_twin(cfg, ours, device)
    with torch.no_grad(), autocast_context(device, dtype):
        probe = tokens[:2, :-1]
        out["initial_logits_max_abs_diff"] = (ours(probe).float() - ref(probe).logits.float()).abs().max().item()

    refs = {"hf": "grouped_mm", "hf_eager": "eager"} if cfg.moe is not None else {"hf": None}
    for mode in modes:
        steps = {}
        fresh = build_model(cfg, device)  # fresh copies with the initial weights for every mode
        fresh.load_state_dict(ours.state_dict())
        if mode == "compiled":
            compile_blocks(fresh)  # what training.compile does
        steps["ours"] = make_step(fresh, trainer_loss(fresh), device, dtype, tokens)
        for label, experts in refs.items():
            twin = hf_twin(cfg, ours, device, experts or "grouped_mm")
            runner = torch.compile(twin) if mode == "compiled" else twin
            steps[label] = make_step(twin, logits_loss(lambda x, m=runner: m(x).logits), device, dtype, tokens)
        try:
            secs = time_interleaved(steps, device, warmup, iters)
        except Exception as e:  # compile needs a working backend (C++ compiler, triton, ...)
            if mode != "compiled":
                raise
            warnings.warn(f"torch.compile failed ({type(e).__name__}: {e}); no compiled numbers")
            out[mode] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
            continue
        row: dict = {label: {"step_ms": 1e3 * sec, "tokens_per_s": tokens_per_step / sec}
                     for label, sec in secs.items()}
        row["ratio"] = row["ours"]["tokens_per_s"] / row["hf"]["tokens_per_s"]
        if "hf_eager" in row:
            row["ratio_vs_hf_eager"] = row["ours"]["tokens_per_s"] / row["hf_eager"]["tokens_per_s"]
        out[mode] = row
    return out


def main() -> None:
    p = argparse.ArgumentParser(description="Training-step speed: ours vs transformers (Llama, DeepSeek-V3).")
    p.add_argument("--quick", action="store_true", help="fewer iterations (a smoke run)")
    p.add_argument("--configs", default="A,B,D", help="comma-separated subset of A,B,D")
    p.add_argument("--modes", default="eager,compiled", help="comma-separated subset of eager,compiled")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    p.add_argument("--out", default=None, help="also write the JSON here")
    args = p.parse_args()
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if bad := [c for c in configs if c not in CONFIGS]:
        raise UserError(f"unknown config(s) {bad} (allowed: {', '.join(CONFIGS)})")
    if bad := [m for m in modes if m not in ("eager", "compiled")]:
        raise UserError(f"unknown mode(s) {bad} (allowed: eager, compiled)")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    warmup, iters = (1, 3) if args.quick else (3, 10)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    peak, peak_source = peak_flops(device, dtype)
    results = {c: bench_config(c, modes, device, dtype, warmup, iters) for c in configs}
    for res in results.values():
        fpt = res["model_tflops_per_step"] * 1e12 / res["tokens_per_step"]
        for mode in modes:
            for label in ("ours", "hf", "hf_eager"):
                if label in res[mode]:  # absent when compile failed
                    res[mode][label]["mfu"] = mfu(fpt, res[mode][label]["tokens_per_s"], peak)
    result = {
        "benchmark": "train_speed", "device": str(device), "dtype": str(dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(), "torch": torch.__version__, "quick": args.quick,
        "mfu_peak_source": peak_source, "configs": results,
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    cli_main(main)
