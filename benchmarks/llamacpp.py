"""llama.cpp as the reference of `benchmarks/decode_speed.py --llamacpp` (through ``llama-cpp-python``).

The benchmark's Hugging Face Llama is exported to GGUF by our own converter
(`utils/convert_hf.py --to_gguf`, f32 or q8_0) and run by llama.cpp on the same threads. Greedy
decoding drives llama.cpp's C API directly (``llama_batch`` + ``llama_decode``, the loop of
llama.cpp's ``examples/batched``): one batch per step holding the last token of every stream
(each stream its own sequence id in one KV cache), the next token the argmax of its logits. So
one stream and 16 concurrent streams take the same path, and no Python sampler is timed.
"""
from __future__ import annotations

import ctypes
import random
import statistics
import time
from pathlib import Path

import numpy as np

from data_pipeline.tokenizer.io import write_hf_configs
from data_pipeline.tokenizer.train_tokenizer import train_hf
from utils.convert_hf import checkpoint_to_gguf

TOKENIZER_TEXT = ["Once upon a time there was a little cat who liked to play in the sun."] * 4


def export_gguf(hf_dir: Path, out: Path, outtype: str) -> Path:
    """GGUF of a Hugging Face directory without a tokenizer: a small byte-level BPE is put beside it
    first (the benchmark feeds token ids; the export pads the vocabulary to the model's)."""
    if not (hf_dir / "tokenizer.json").is_file():
        train_hf(TOKENIZER_TEXT, 300).save(str(hf_dir / "tokenizer.json"))
        write_hf_configs(hf_dir)
    checkpoint_to_gguf(hf_dir, out, outtype)
    return out


class LlamaCpp:
    """A GGUF model in llama.cpp with a KV cache for ``max_streams`` sequences of ``max_len`` tokens."""

    def __init__(self, path: Path, threads: int, max_streams: int, max_len: int, repack: bool = True) -> None:
        """``repack=False`` keeps the weights in the file's layout (``use_extra_bufts`` off): llama.cpp's
        CPU repacking of Q8_0 into its interleaved layout dies with a general protection fault in
        libggml-cpu on this machine's CPU (llama-cpp-python 0.3.36); f32 is never repacked."""
        import llama_cpp

        self.lib = llama_cpp
        llama_cpp.llama_backend_init()
        mparams = llama_cpp.llama_model_default_params()
        mparams.use_extra_bufts = repack
        self.model = llama_cpp.llama_model_load_from_file(str(path).encode(), mparams)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {path}")
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = params.n_batch = max_streams * max_len
        params.n_ubatch = 512
        params.n_seq_max = max_streams
        params.n_threads = params.n_threads_batch = threads
        params.type_k = params.type_v = 0  # f32 K/V (llama.cpp's default is f16), as our engine's fp32 pool
        self.ctx = llama_cpp.llama_init_from_model(self.model, params)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self.model))
        self.batch = llama_cpp.llama_batch_init(max_streams * max_len, 0, max_streams)

    def close(self) -> None:
        self.lib.llama_batch_free(self.batch)
        self.lib.llama_free(self.ctx)
        self.lib.llama_model_free(self.model)

    def _clear(self) -> None:
        lib = self.lib
        lib.llama_memory_clear(lib.llama_get_memory(self.ctx), True)

    def _decode(self, rows: list[tuple[int, list[int], int]]) -> list[int]:
        """One llama_decode of rows (stream, tokens, first position); the argmax after each row's last token."""
        b, n = self.batch, 0
        last = []
        for stream, tokens, start in rows:
            for j, token in enumerate(tokens):
                b.token[n], b.pos[n], b.n_seq_id[n] = token, start + j, 1
                b.seq_id[n][0] = stream
                b.logits[n] = j == len(tokens) - 1
                n += 1
            last.append(n - 1)
        b.n_tokens = n
        if self.lib.llama_decode(self.ctx, b) != 0:
            raise RuntimeError("llama_decode failed")
        out = []
        for i in last:
            ptr = self.lib.llama_get_logits_ith(self.ctx, i)
            logits = np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)), shape=(self.n_vocab,))
            out.append(int(logits.argmax()))
        return out

    def generate(self, prompts: list[list[int]], n: int) -> tuple[list[list[int]], float]:
        """n greedy tokens for every prompt at once: (tokens per stream, seconds)."""
        self._clear()
        start = time.perf_counter()
        nxt = self._decode([(s, p, 0) for s, p in enumerate(prompts)])  # prefill
        out = [[t] for t in nxt]
        for k in range(1, n):
            nxt = self._decode([(s, [out[s][-1]], len(p) + k - 1) for s, p in enumerate(prompts)])
            for s, t in enumerate(nxt):
                out[s].append(t)
        return out, time.perf_counter() - start


def _tps(n: int, t_full: list[float], t_one: list[float]) -> float:
    """Decode tokens/s from interleaved timings of n tokens and of 1 (prefill left out), medians."""
    return (n - 1) / statistics.median([a - b for a, b in zip(t_full, t_one)])


def compare(name: str, hf_dir: Path, tmp: Path, n: int, rounds: int, threads: int, streams: int) -> dict:
    """Our engine (fp32 with the load-time rewrites = now; fp32 without = before; int8; fp32 and int8 with the
    compiled decode step) vs llama.cpp (f32, q8_0) on the same weights, prompt, threads and token count, timed in
    interleaved rounds after a warm-up (which compiles the compiled engines' buckets); ratios ours / theirs."""
    from benchmarks.decode_speed import CONFIGS, PROMPT_LEN, run_ours
    from inference.engine.llm_engine import LLMEngine

    rng = random.Random(0)
    vocab = CONFIGS[name][0]
    prompts = [[rng.randrange(vocab) for _ in range(PROMPT_LEN)] for _ in range(streams)]
    max_len = PROMPT_LEN + n + 1
    ours = {
        "fp32": LLMEngine(hf_dir, device="cpu", dtype="fp32", max_num_seqs=streams),
        "fp32_before": LLMEngine(hf_dir, device="cpu", dtype="fp32", max_num_seqs=streams, optimize=False),
        "int8": LLMEngine(hf_dir, device="cpu", dtype="fp32", max_num_seqs=streams, quantize="int8"),
        "fp32_compiled": LLMEngine(hf_dir, device="cpu", dtype="fp32", max_num_seqs=streams, compile=True),
        "int8_compiled": LLMEngine(hf_dir, device="cpu", dtype="fp32", max_num_seqs=streams, quantize="int8",
                                   compile=True),
    }
    theirs = {t: LlamaCpp(export_gguf(hf_dir, tmp / f"{name}-{t}.gguf", t), threads, streams, max_len,
                          repack=t != "q8_0") for t in ("f32", "q8_0")}
    one = prompts[:1]
    runs = {f"ours_{k}": (lambda e=e, p=one, k=1: run_ours(e, p, k)[2]) for k, e in ours.items()}
    runs.update({f"llamacpp_{k}": (lambda m=m, p=one, k=1: m.generate(p, k)[1]) for k, m in theirs.items()})
    for fn in runs.values():  # warm-up
        fn(k=4)
    full = {k: [] for k in runs}
    first = {k: [] for k in runs}
    for _ in range(rounds):  # interleaved: background load hits all alike
        for key, fn in runs.items():
            full[key].append(fn(k=n))
            first[key].append(fn(k=1))
    tps = {key: _tps(n, full[key], first[key]) for key in runs}
    ours_tokens = run_ours(ours["fp32"], one, n)[0][0]
    llama_tokens = theirs["f32"].generate(one, n)[0][0]
    result = {
        "single_stream_tokens_per_s": {k: round(v, 1) for k, v in tps.items()},
        "greedy_tokens_match_llamacpp_f32": ours_tokens == llama_tokens,
        "llamacpp_q8_0_repacked": False,  # see LlamaCpp: its repacked Q8_0 path crashes here
        "ratios_single_stream": {
            "ours_fp32_vs_llamacpp_f32": round(tps["ours_fp32"] / tps["llamacpp_f32"], 3),
            "ours_fp32_before_vs_llamacpp_f32": round(tps["ours_fp32_before"] / tps["llamacpp_f32"], 3),
            "ours_int8_vs_llamacpp_q8_0": round(tps["ours_int8"] / tps["llamacpp_q8_0"], 3),
            "ours_fp32_compiled_vs_llamacpp_f32": round(tps["ours_fp32_compiled"] / tps["llamacpp_f32"], 3),
            "ours_int8_compiled_vs_llamacpp_q8_0": round(tps["ours_int8_compiled"] / tps["llamacpp_q8_0"], 3),
        },
        "greedy_tokens_compiled_match_eager": run_ours(ours["fp32_compiled"], one, n)[0][0] == ours_tokens,
        "compile_off": {k: e.runner.compiled.disabled for k, e in ours.items()
                        if e.runner.compiled is not None and e.runner.compiled.disabled},
    }
    if streams > 1:
        agg = {"ours_fp32": [], "ours_fp32_before": [], "ours_fp32_compiled": [], "llamacpp_f32": []}
        run_ours(ours["fp32_compiled"], prompts, 4)  # compiles the batch bucket of all the streams
        for _ in range(rounds):
            for key in ("ours_fp32", "ours_fp32_before", "ours_fp32_compiled"):
                agg[key].append(streams * n / run_ours(ours[key.removeprefix("ours_")], prompts, n)[2])
            agg["llamacpp_f32"].append(streams * n / theirs["f32"].generate(prompts, n)[1])
        med = {k: statistics.median(v) for k, v in agg.items()}
        result[f"streams_{streams}_aggregate_tokens_per_s"] = {k: round(v, 1) for k, v in med.items()}
        result[f"ratios_{streams}_streams"] = {
            "ours_fp32_vs_llamacpp_f32": round(med["ours_fp32"] / med["llamacpp_f32"], 3),
            "ours_fp32_before_vs_llamacpp_f32": round(med["ours_fp32_before"] / med["llamacpp_f32"], 3),
            "ours_fp32_compiled_vs_llamacpp_f32": round(med["ours_fp32_compiled"] / med["llamacpp_f32"], 3),
        }
    for model in theirs.values():
        model.close()
    return result
