"""Training-step speed of our models vs `transformers` (``LlamaForCausalLM``, ``DeepseekV3ForCausalLM``), side by side.

Both models hold the same weights (A, B: a random Hugging Face Llama imported through
`model/hf.py`; D: our random DeepSeek-V3 exported through it, `benchmarks/hf_twin.py`), see the
same batch, run on the same threads and time the same step:
forward, cross-entropy on the logits, backward. Measurements are interleaved (one step of
each model in turn, repeated) so background load hits all of them alike; medians are
reported, and the speedup is the median over rounds of t_hf / t_ours (> 1: ours is faster).
``torch.compile`` of our model is timed too (skipped with a warning where it fails). Each
model's ``mfu`` uses `model.flops_per_token` (6 N + attention) over the trainer's one peak
definition (`trainer.metrics.peak_flops`; on a CPU, a measured fp32 matmul), named in
``mfu_peak_source``; for a MoE, N is the active parameters (of each MoE layer the router, the
shared and the top-k routed experts), reported in ``params``.

Config D (``--configs D``, not in the default run) is the `bench-D` preset: DeepSeek-V3
(Liu et al. 2024) with MLA (kv_lora_rank 64, q_lora_rank 128, rope/nope/v head dims 16/32/32),
8 routed experts top-2 + 1 shared (expert ffn 128), the first layer dense (ffn 688); seq 256,
batch 8. transformers runs its experts with ``grouped_mm`` (its default), named in
``hf_experts_implementation``.

``--mamba2`` adds a Mamba-2 model (`model.mamba2`, eager) of the Llama's width and vocabulary
whose layer count brings its parameters closest to the Llama's, timed in the same rounds on the
same batch: ``mamba2`` (its tokens/s) and ``speedup_mamba2_vs_ours`` (> 1: faster than our Llama).

    python benchmarks/model_speed.py                 # configs A and B, eager + compiled
    python benchmarks/model_speed.py --configs D     # DeepSeek-V3 (MLA + MoE) vs DeepseekV3ForCausalLM
    python benchmarks/model_speed.py --configs A --compile off --iters 3
    python benchmarks/model_speed.py --mamba2 --compile off

Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable

if __package__ in (None, ""):  # run as a script: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks.hf_twin import hf_twin, mla_moe_shape  # noqa: E402
from model import ModelConfig, build_model, count_params, flops_per_token, get_preset  # noqa: E402
from model.hf import load_hf_dir  # noqa: E402
from trainer.metrics import mfu, peak_flops  # noqa: E402

# name: (vocab, dim, layers, heads, kv heads, ffn hidden, seq len, batch)
CONFIGS = {
    "A": (4096, 256, 4, 8, 4, 688, 256, 8),
    "B": (8192, 512, 8, 8, 8, 1376, 512, 4),
}
PRESETS = {"D": ("bench-D", 256, 8)}  # name: (our preset, seq len, batch); DeepSeek-V3, MLA + MoE


def seq_len_and_batch(name: str) -> tuple[int, int]:
    return CONFIGS[name][-2:] if name in CONFIGS else PRESETS[name][1:]


def hf_and_ours(name: str, tmp: Path):
    """A random transformers model (sdpa attention) and our model with the same weights: a
    Llama config starts from transformers' init, a preset config from ours (exported)."""
    import transformers

    if name in PRESETS:
        cfg = get_preset(PRESETS[name][0])
        torch.manual_seed(0)
        ours = build_model(cfg)
        return hf_twin(cfg, ours, torch.device("cpu")), ours.train(), cfg
    vocab, dim, layers, heads, kv_heads, ffn, seq_len, _ = CONFIGS[name]
    hf_cfg = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=dim, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv_heads, intermediate_size=ffn, max_position_embeddings=seq_len,
        rms_norm_eps=1e-5, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(hf_cfg, attn_implementation="sdpa")
    hf.save_pretrained(tmp / name)
    cfg, state_dict = load_hf_dir(tmp / name)
    ours = build_model(cfg)
    ours.load_state_dict(state_dict, strict=True)
    return hf.train(), ours.train(), cfg


def mamba2_of_equal_size(llama: ModelConfig) -> ModelConfig:
    """A Mamba-2 model of the Llama's width and vocabulary (64-wide heads, state 64, chunks of
    64) with the layer count whose total parameters come closest to the Llama's."""
    target = count_params(llama)["total"]
    base = dict(family="mamba2", vocab_size=llama.vocab_size, dim=llama.dim, max_seq_len=llama.max_seq_len,
                position_type="none", tie_embeddings=llama.tie_embeddings, mamba_head_dim=64, mamba_state_size=64,
                mamba_chunk_size=64)
    sizes = [ModelConfig(**base, n_layers=n) for n in range(1, 4 * llama.n_layers + 1)]
    return min(sizes, key=lambda c: abs(count_params(c)["total"] - target))


def train_step(model: torch.nn.Module, tokens: torch.Tensor, targets: torch.Tensor, hf: bool) -> None:
    """Forward, token cross-entropy, backward; gradients freed afterwards."""
    logits = model(tokens).logits if hf else model(tokens)  # (B, T, V)
    loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.view(-1))
    loss.backward()
    for p in model.parameters():
        p.grad = None


def measure(steps: dict[str, Callable[[], None]], warmup: int, iters: int) -> dict[str, list[float]]:
    """Interleaved timings (seconds) of each step function: warm-up rounds, then ``iters`` rounds."""
    for _ in range(warmup):
        for fn in steps.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(iters):
        for key, fn in steps.items():
            t0 = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - t0)
    return times


def config_shape(name: str, cfg: ModelConfig) -> dict:
    if name in CONFIGS:
        return dict(zip(("vocab", "dim", "layers", "heads", "kv_heads", "ffn", "seq_len", "batch"), CONFIGS[name]))
    seq_len, batch = seq_len_and_batch(name)
    return {"preset": PRESETS[name][0], **mla_moe_shape(cfg), "seq_len": seq_len, "batch": batch}


def bench_config(name: str, tmp: Path, compile_mode: str, warmup: int, iters: int, mamba2: bool = False) -> dict:
    hf, ours, cfg = hf_and_ours(name, tmp)
    vocab = cfg.vocab_size
    seq_len, batch = seq_len_and_batch(name)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab, (batch, seq_len), generator=g)
    targets = torch.randint(0, vocab, (batch, seq_len), generator=g)
    with torch.no_grad():  # the same weights: the same logits (up to float summation order)
        probe = tokens[:2]
        logits_diff = (ours(probe) - hf(probe).logits).abs().max().item()
    steps: dict[str, Callable[[], None]] = {}
    if compile_mode in ("off", "both") or mamba2:
        steps["ours"] = lambda: train_step(ours, tokens, targets, hf=False)
    steps["hf_sdpa"] = lambda: train_step(hf, tokens, targets, hf=True)
    mamba_cfg = mamba2_of_equal_size(cfg) if mamba2 else None
    if mamba_cfg is not None:
        torch.manual_seed(0)
        mamba = build_model(mamba_cfg).train()
        steps["mamba2"] = lambda: train_step(mamba, tokens, targets, hf=False)
    compile_error = None
    if compile_mode in ("on", "both"):
        compiled = torch.compile(ours)
        try:
            t0 = time.perf_counter()
            train_step(compiled, tokens, targets, hf=False)  # compiles
            compile_s = time.perf_counter() - t0
            steps["ours_compiled"] = lambda: train_step(compiled, tokens, targets, hf=False)
        except Exception as e:  # compile support varies by platform: report it, keep the eager numbers
            compile_error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            warnings.warn(f"torch.compile failed for config {name}, skipping the compiled run: {compile_error}")
    times = measure(steps, warmup, iters)

    tokens_per_step = batch * seq_len
    fpt = flops_per_token(cfg, seq_len)
    peak, _ = peak_flops(torch.device("cpu"), torch.float32)
    result: dict = {"shape": config_shape(name, cfg), "flops_per_token": fpt,
                    "initial_logits_max_abs_diff": logits_diff}
    if cfg.moe is not None:
        result["params"] = count_params(cfg)  # MFU counts the active ones
        result["hf_experts_implementation"] = getattr(hf.config, "_experts_implementation", None)
    for key, ts in times.items():
        tps = tokens_per_step / statistics.median(ts)
        key_fpt = flops_per_token(mamba_cfg, seq_len) if key == "mamba2" else fpt
        result[key] = {
            "step_s_median": round(statistics.median(ts), 4),
            "step_s_all": [round(t, 4) for t in ts],
            "tokens_per_s": round(tps, 1),
            "mfu": round(mfu(key_fpt, tps, peak), 3),
        }
    if mamba_cfg is not None:
        result["mamba2"].update(
            params=count_params(mamba_cfg)["total"], llama_params=count_params(cfg)["total"],
            shape=dict(layers=mamba_cfg.n_layers, d_inner=mamba_cfg.mamba_inner, heads=mamba_cfg.mamba_heads,
                       head_dim=mamba_cfg.mamba_head_dim, state=mamba_cfg.mamba_state_size,
                       chunk=mamba_cfg.mamba_chunk_size))
        result["speedup_mamba2_vs_ours"] = round(statistics.median(
            [o / m for o, m in zip(times["ours"], times["mamba2"])]), 3)
    for key in ("ours", "ours_compiled"):
        if key in times:
            # per round: the two steps ran back to back under the same background load
            per_round = [h / o for o, h in zip(times[key], times["hf_sdpa"])]
            result[f"speedup_{key}_vs_hf"] = round(statistics.median(per_round), 3)
    if "ours_compiled" in times:
        result["compile_s"] = round(compile_s, 1)
    if compile_error:
        result["compile_error"] = compile_error
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description="forward+backward tokens/s: ours vs transformers (Llama, DeepSeek-V3)")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=[*CONFIGS, *PRESETS],
                        help="A, B (Llama; the default) and D (DeepSeek-V3, MLA + MoE)")
    parser.add_argument("--compile", choices=("off", "on", "both"), default="both",
                        help="time our model eager (off), compiled (on) or both")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--mamba2", action="store_true",
                        help="also time a Mamba-2 model with about the Llama's parameter count (eager)")
    args = parser.parse_args()

    import transformers

    if args.threads:
        torch.set_num_threads(args.threads)
    report: dict = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
        "device": "cpu",
        "mfu_peak_source": peak_flops(torch.device("cpu"), torch.float32)[1],
        "configs": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.configs:
            report["configs"][name] = bench_config(name, Path(tmp), args.compile, args.warmup, args.iters, args.mamba2)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
