"""Decode speed and KV memory of our inference engine, side by side with `transformers` `generate`.

Both run the same weights: a random Hugging Face Llama (sdpa attention) saved with
``save_pretrained`` and loaded by our engine through `model/hf.py` (config D: our random
DeepSeek-V3 exported with `model.hf.save_hf_dir` and loaded by transformers as
``DeepseekV3ForCausalLM``, `benchmarks/hf_twin.py`); same prompt, same threads, greedy decoding,
no eos stop. Measured:

- single-stream decode tokens/s, ours vs ``generate`` (timings interleaved, medians; decode time
  = time for N new tokens minus time for 1, so prefill is left out), and whether the greedy
  tokens agree (and for how many leading tokens);
- weight bytes read per second at batch 1 against a memory bandwidth measured in the same run
  (sum of a large fp32 tensor): decoding one token reads every active weight once (the embedding
  table only one row; of a MoE layer the router, the shared and top-k routed experts), so batch-1
  decoding of a model larger than the caches is bound by it; and
  against the bare matrix-vector products of one token (the same weights and kernels, nothing
  else, timed in the same rounds): the floor of a decode step, so that each engine's per-token
  overhead above it is reported too;
- aggregate tokens/s of 16 concurrent streams vs 1 (continuous batching), time to first token
  and inter-token latency p50 / p99;
- KV memory under a mixed-length workload: peak blocks in use vs the pool allocated vs a
  contiguous cache preallocating max_model_len for each of max_num_seqs sequences;
- MLA (DeepSeek-V2, Liu et al. 2024) latent cache bytes per token vs the equivalent MHA cache.

Config D (``--configs D``, not in the default run) is the `bench-D` preset: DeepSeek-V3
(Liu et al. 2024) with MLA (kv_lora_rank 64, q_lora_rank 128, rope/nope/v head dims 16/32/32),
8 routed experts top-2 + 1 shared, the first layer dense. Our engine decodes it over the paged
latent cache with the absorbed MLA path (queries folded into latent space, `model/mla.py`);
its report says which path each decode step's attention took (``mla_attention_calls``) and the
cache bytes per token it holds beside those of the equivalent MHA cache (``latent_cache``).

    python benchmarks/decode_speed.py                 # configs A and B
    python benchmarks/decode_speed.py --configs D     # DeepSeek-V3 (MLA + MoE) vs DeepseekV3ForCausalLM
    python benchmarks/decode_speed.py --configs D --compile   # + our compiled decode step, one stream
    python benchmarks/decode_speed.py --quick         # a quick smoke run (fewer tokens / rounds)
    python benchmarks/decode_speed.py --llamacpp --threads 2   # vs llama.cpp instead (requirements-bench.txt)
    python benchmarks/decode_speed.py --chunked_prefill 16 64 --threads 2   # a long prompt vs 8 decoding streams

``--llamacpp`` compares against llama.cpp (`benchmarks/llamacpp.py`) instead of ``generate``: the
same random Llama exported to GGUF by our converter, one stream on A and B (ours fp32 vs
llama.cpp f32, ours before the load-time rewrites, ours int8 vs llama.cpp q8_0) and 16
concurrent streams on B (llama.cpp batched through its C API), ratios ours / llama.cpp.

Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

if __package__ in (None, ""):  # run as a script: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks.hf_twin import load_hf_twin, mla_moe_shape, save_twin_dir  # noqa: E402
from benchmarks.mla_decode import count_mla_attention, latent_cache_report, mla_cache_bytes  # noqa: E402
from inference.engine.llm_engine import LLMEngine  # noqa: E402
from inference.engine.sampling import SamplingParams  # noqa: E402
from model import build_model, count_params, get_preset  # noqa: E402
from model.config import ModelConfig  # noqa: E402
from model.moe import MoE  # noqa: E402
from utils.errors import UserError, cli_main  # noqa: E402

# name: (vocab, dim, layers, heads, kv heads, ffn hidden)
CONFIGS = {"A": (4096, 256, 4, 8, 4, 688), "B": (8192, 512, 8, 8, 8, 1376)}
PRESETS = {"D": "bench-D"}  # configs built from our presets (DeepSeek-V3: MLA + MoE)
MAX_LEN = 512
PROMPT_LEN = 32
BANDWIDTH_MB = 512


def save_hf_llama(name: str, directory: Path, max_len: int = MAX_LEN):
    """A random transformers Llama of config ``name`` saved to ``directory`` (the model is returned)."""
    import transformers

    vocab, dim, layers, heads, kv_heads, ffn = CONFIGS[name]
    cfg = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=dim, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv_heads, intermediate_size=ffn, max_position_embeddings=max_len, rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()
    hf.save_pretrained(directory)
    return hf


def preset_config(name: str, max_len: int = MAX_LEN) -> ModelConfig:
    return get_preset(PRESETS[name], max_seq_len=max_len)


def save_hf_model(name: str, directory: Path, max_len: int = MAX_LEN):
    """The transformers model of config ``name`` saved to ``directory`` (returned, eval mode). A
    Llama config is a random transformers Llama; a preset config is our random model exported."""
    if name in CONFIGS:
        return save_hf_llama(name, directory, max_len)
    cfg = preset_config(name, max_len)
    torch.manual_seed(0)
    save_twin_dir(cfg, build_model(cfg), directory)
    return load_hf_twin(cfg, directory)


def config_shape(name: str) -> dict:
    if name in CONFIGS:
        return dict(zip(("vocab", "dim", "layers", "heads", "kv_heads", "ffn"), CONFIGS[name]))
    cfg = preset_config(name)
    return {"preset": PRESETS[name], **mla_moe_shape(cfg), "params": count_params(cfg)}


def greedy(n: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)


def run_ours(engine: LLMEngine, prompts: list[list[int]], n: int) -> tuple[list[list[int]], list[list[float]], float]:
    """Generate n tokens for every prompt at once; (tokens, per-request token times (s after start), total s)."""
    start = time.perf_counter()
    ids = [engine.add_request(p, greedy(n)) for p in prompts]
    tokens = {rid: [] for rid in ids}
    times = {rid: [] for rid in ids}
    while engine.has_unfinished():
        outs = engine.step()
        now = time.perf_counter() - start
        for out in outs:
            tokens[out.request_id] += out.new_token_ids
            times[out.request_id] += [now] * len(out.new_token_ids)
    return [tokens[r] for r in ids], [times[r] for r in ids], time.perf_counter() - start


@torch.inference_mode()
def run_hf(hf, prompt: list[int], n: int) -> tuple[list[int], float]:
    ids = torch.tensor([prompt])
    start = time.perf_counter()
    out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                      do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist(), time.perf_counter() - start


def memory_bandwidth_gbs(rounds: int) -> float:
    """Read bandwidth: median GB/s of summing a BANDWIDTH_MB fp32 tensor (far larger than the caches)."""
    x = torch.ones(BANDWIDTH_MB * 2**20 // 4)
    x.sum()
    times = []
    for _ in range(max(3, rounds)):
        t0 = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - t0)
    return x.numel() * 4 / statistics.median(times) / 1e9


def gemv_pass(model: torch.nn.Module) -> Callable[[], None]:
    """The matrix-vector products of one decode token and nothing else (the same weights and
    kernels): the floor of a batch-1 decode step, and the bandwidth those kernels reach."""
    from inference.engine.optimize import TransposedLinear

    products = [(m.in_features, lambda x, m=m: x @ m.weight_t) for m in model.modules()
                if isinstance(m, TransposedLinear)]
    products += [(m.in_features, lambda x, m=m: F.linear(x, m.weight)) for m in model.modules()
                 if isinstance(m, torch.nn.Linear)]
    if model.lm_head is None:
        products.append((model.embed.weight.shape[1], lambda x: F.linear(x, model.embed.weight)))
    for moe in (m for m in model.modules() if isinstance(m, MoE)):  # the router and k routed experts
        products.append((moe.gate.weight.shape[1], lambda x, w=moe.gate.weight: F.linear(x, w)))
        experts = moe.experts
        for e in range(moe.moe.num_experts_per_tok):
            mats = ([experts.gate_proj[e]] if experts.is_glu else []) + [experts.up_proj[e], experts.down_proj[e]]
            products += [(w.shape[1], lambda x, w=w: F.linear(x, w)) for w in mats]
    inputs = [torch.randn(1, k) for k, _ in products]

    def run() -> None:
        with torch.inference_mode():
            for x, (_, product) in zip(inputs, products):
                product(x)

    return run


def weight_bytes_per_token(engine: LLMEngine) -> int:
    """Bytes of weights one decode step reads: every active parameter once (of a MoE layer's routed
    experts the top-k), of the input embedding one row."""
    cfg = engine.config
    n = count_params(cfg)["active"]
    if not cfg.tie_embeddings:  # the untied input table is only looked up
        n -= cfg.vocab_size * cfg.dim - cfg.dim
    return n * engine.dtype.itemsize


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q / 100 * len(values)))]


def latency_stats(times: list[list[float]]) -> dict:
    ttft = [t[0] for t in times]
    itl = [b - a for t in times for a, b in zip(t, t[1:]) if b > a]  # tokens of one step share a time
    ms = lambda v: round(v * 1e3, 3)  # noqa: E731
    return {"ttft_ms_p50": ms(percentile(ttft, 50)), "ttft_ms_p99": ms(percentile(ttft, 99)),
            "itl_ms_p50": ms(percentile(itl, 50)), "itl_ms_p99": ms(percentile(itl, 99))}


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens ``a`` and ``b`` share."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def bench_config(name: str, tmp: Path, n: int, rounds: int, bandwidth: float, compile_: bool = False) -> dict:
    hf = save_hf_model(name, tmp / name)
    engine = LLMEngine(tmp / name, device="cpu", dtype="fp32", max_num_seqs=16)
    compiled = LLMEngine(tmp / name, device="cpu", dtype="fp32", max_num_seqs=16, compile=True) if compile_ else None
    rng = random.Random(0)
    vocab = engine.config.vocab_size
    prompt = [rng.randrange(vocab) for _ in range(PROMPT_LEN)]
    run_ours(engine, [prompt], 4)  # warm-up
    run_hf(hf, prompt, 4)
    if compiled is not None:
        run_ours(compiled, [prompt], 4)  # compiles the batch-1 bucket

    ours_tokens, ours_times, _ = run_ours(engine, [prompt], n)
    hf_tokens, _ = run_hf(hf, prompt, n)
    gemv = gemv_pass(engine.model)
    t_ours, t_hf, t_gemv, t_compiled, ratios = [], [], [], [], []
    for _ in range(rounds):  # interleaved: background load hits all alike
        full, one = run_ours(engine, [prompt], n)[2], run_ours(engine, [prompt], 1)[2]
        if compiled is not None:
            t_compiled.append(run_ours(compiled, [prompt], n)[2] - run_ours(compiled, [prompt], 1)[2])
        hf_full, hf_one = run_hf(hf, prompt, n)[1], run_hf(hf, prompt, 1)[1]
        t_ours.append(full - one)
        t_hf.append(hf_full - hf_one)
        ratios.append(t_hf[-1] / t_ours[-1])
        start = time.perf_counter()
        for _ in range(n - 1):
            gemv()
        t_gemv.append(time.perf_counter() - start)
    ours_tps = (n - 1) / statistics.median(t_ours)
    hf_tps = (n - 1) / statistics.median(t_hf)
    gemv_tps = (n - 1) / statistics.median(t_gemv)
    weight_bytes = weight_bytes_per_token(engine)
    result = {
        "shape": config_shape(name),
        "prompt_tokens": PROMPT_LEN, "new_tokens": n,
        "greedy_tokens_match_hf": ours_tokens[0] == hf_tokens,
        "greedy_tokens_agreeing_prefix": common_prefix(ours_tokens[0], hf_tokens),
        "single_stream": {
            "ours_tokens_per_s": round(ours_tps, 1),
            "hf_generate_tokens_per_s": round(hf_tps, 1),
            "speedup_vs_hf": round(statistics.median(ratios), 3),
            **latency_stats(ours_times),
        },
        "per_token_ms": {  # decode time per token = the bare matrix-vector products + everything else
            "gemv_floor": round(1e3 / gemv_tps, 3),
            "ours": round(1e3 / ours_tps, 3),
            "hf_generate": round(1e3 / hf_tps, 3),
            "ours_overhead": round(1e3 / ours_tps - 1e3 / gemv_tps, 3),
            "hf_overhead": round(1e3 / hf_tps - 1e3 / gemv_tps, 3),
        },
        "weights": {
            "bytes_read_per_token": weight_bytes,
            "ours_weight_gb_per_s": round(weight_bytes * ours_tps / 1e9, 2),
            "hf_weight_gb_per_s": round(weight_bytes * hf_tps / 1e9, 2),
            "gemv_kernels_gb_per_s": round(weight_bytes * gemv_tps / 1e9, 2),
            "ours_fraction_of_bandwidth": round(weight_bytes * ours_tps / 1e9 / bandwidth, 3),
            "ours_fraction_of_gemv_kernels": round(ours_tps / gemv_tps, 3),
        },
    }
    if compiled is not None:
        compiled_tps = (n - 1) / statistics.median(t_compiled)
        result["single_stream"].update({
            "ours_compiled_tokens_per_s": round(compiled_tps, 1),
            "compiled_speedup_vs_hf": round(compiled_tps / hf_tps, 3),
            "greedy_tokens_compiled_match_eager": run_ours(compiled, [prompt], n)[0][0] == ours_tokens[0],
            "compile_off": compiled.runner.compiled.disabled if compiled.runner.compiled is not None else True})
    streams = [[rng.randrange(vocab) for _ in range(PROMPT_LEN)] for _ in range(16)]
    _, times16, total16 = run_ours(engine, streams, n)
    _, _, total1 = run_ours(engine, streams[:1], n)
    result["concurrency"] = {
        "streams": 16,
        "aggregate_tokens_per_s_16": round(16 * n / total16, 1),
        "tokens_per_s_1": round(n / total1, 1),
        "aggregate_speedup_16_vs_1": round((16 * n / total16) / (n / total1), 2),
        **latency_stats(times16),
    }
    if engine.config.attention_type == "mla":
        result["hf_experts_implementation"] = getattr(hf.config, "_experts_implementation", None)
        engine.reset_prefix_cache()  # the prompt is prefilled again, not found in the cache
        with count_mla_attention(engine.model) as calls:  # per layer: one for the prefill, one per decode step
            run_ours(engine, [prompt], 8)
        result["mla_attention_calls"] = {**calls, "mla_layers": engine.config.n_layers, "decode_steps": 8 - 1}
        result["latent_cache"] = latent_cache_report(engine.config, engine.dtype, engine.cache.bytes_per_token)
    return result


def kv_memory_workload(tmp: Path, quick: bool) -> dict:
    """Mixed prompt / output lengths on config A: KV memory really used vs allocated vs contiguous."""
    engine = LLMEngine(tmp / "A", device="cpu", dtype="fp32", max_num_seqs=16)
    rng = random.Random(1)
    num = 24 if quick else 48
    for _ in range(num):
        prompt = [rng.randrange(CONFIGS["A"][0]) for _ in range(rng.randint(8, 200))]
        engine.add_request(prompt, greedy(rng.randint(8, 48 if quick else 160)))
    bm = engine.scheduler.block_manager
    block_bytes = engine.cache.bytes_per_token * bm.block_size
    peak_blocks = peak_tokens = 0
    while engine.has_unfinished():
        engine.step()
        if bm.num_used_blocks > peak_blocks:
            peak_blocks = bm.num_used_blocks
            peak_tokens = sum(len(s) for s in engine.scheduler.running)
    contiguous = engine.scheduler.max_num_seqs * engine.max_model_len * engine.cache.bytes_per_token
    return {
        "requests": num, "max_num_seqs": engine.scheduler.max_num_seqs, "block_size": bm.block_size,
        "peak_used_bytes": peak_blocks * block_bytes,
        "peak_tokens_held": peak_tokens,
        "slot_utilisation_at_peak": round(peak_tokens / (peak_blocks * bm.block_size), 3),
        "pool_allocated_bytes": engine.cache.allocated_bytes,
        "contiguous_max_len_bytes": contiguous,
        "contiguous_over_paged_peak": round(contiguous / (peak_blocks * block_bytes), 2),
    }


def llamacpp_report(args: argparse.Namespace) -> dict:
    """Ours vs llama.cpp on configs A and B (16 concurrent streams on B), see the module docstring."""
    import llama_cpp

    from benchmarks.llamacpp import compare

    report: dict = {"torch": torch.__version__, "llama_cpp_python": llama_cpp.__version__,
                    "threads": torch.get_num_threads(), "device": "cpu", "new_tokens": args.new_tokens, "configs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.configs:
            save_hf_llama(name, Path(tmp) / name)
            streams = 16 if name == "B" else 1
            report["configs"][name] = compare(name, Path(tmp) / name, Path(tmp), args.new_tokens, args.rounds,
                                              torch.get_num_threads(), streams)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description="decode tokens/s of our engine vs transformers generate")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=[*CONFIGS, *PRESETS],
                        help="A, B (Llama; the default) and D (DeepSeek-V3, MLA + MoE)")
    parser.add_argument("--new_tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--quick", action="store_true", help="32 new tokens, 2 rounds (a smoke run)")
    parser.add_argument("--compile", action="store_true",
                        help="also time our compiled decode step (LLMEngine(compile=True)), one stream")
    parser.add_argument("--llamacpp", action="store_true", help="compare with llama.cpp (llama-cpp-python) instead")
    parser.add_argument("--chunked_prefill", nargs="*", type=int, default=None, metavar="CHUNK",
                        help="instead: ITL of 8 streams on B while a 2,000-token prompt arrives, per chunk size")
    args = parser.parse_args()
    if args.quick:
        args.new_tokens, args.rounds = 32, 2
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers

    if args.llamacpp:
        if bad := [c for c in args.configs if c not in CONFIGS]:
            raise UserError(f"--llamacpp covers the Llama configs {', '.join(CONFIGS)} only, not {', '.join(bad)}")
        print(json.dumps(llamacpp_report(args), indent=2))
        return
    if args.chunked_prefill is not None:
        from benchmarks.chunked_prefill import LONG_PROMPT, chunked_prefill_report

        with tempfile.TemporaryDirectory() as tmp:
            save_hf_llama("B", Path(tmp) / "B", max_len=4096)
            runs = chunked_prefill_report(Path(tmp) / "B", CONFIGS["B"][0], [None, *(args.chunked_prefill or [32])])
        print(json.dumps({"threads": torch.get_num_threads(), "long_prompt_tokens": LONG_PROMPT, "config": "B",
                          "runs": runs}, indent=2))
        return
    bandwidth = memory_bandwidth_gbs(args.rounds)
    report: dict = {
        "torch": torch.__version__, "transformers": transformers.__version__, "threads": torch.get_num_threads(),
        "device": "cpu", "dtype": "fp32", "memory_read_gb_per_s": round(bandwidth, 2), "configs": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.configs:
            report["configs"][name] = bench_config(name, Path(tmp), args.new_tokens, args.rounds, bandwidth,
                                                   args.compile)
        if "A" in args.configs:
            report["kv_memory_mixed_workload"] = kv_memory_workload(Path(tmp), args.quick)
    report["mla_cache"] = mla_cache_bytes()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    cli_main(main)
