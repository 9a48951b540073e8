"""Online RL speed and memory: rollout tokens/s of our engine vs `transformers` ``generate``, the
time split of one GRPO step, and peak memory with and without a reference model.

One policy: a random Llama of config A of `benchmarks/model_speed.py` (vocab 4096, dim 256, 4
layers, 8 heads, 4 KV heads, FFN 688; max_seq_len 256), built by `model.build_model`, saved as
our checkpoint (the stage's ``checkpointing.init_from``) and exported with `model.hf.save_hf_dir`
for transformers (``LlamaForCausalLM``, sdpa attention): both sides hold the same function (the
max logit difference is reported). The tokenizer is a byte-level BPE trained on the built-in
stories, padded with plain added tokens up to the model's vocabulary (so every sampled id
decodes), with the project's chat template. The prompts are the built-in verifiable problems
(`data_pipeline.builtin.verifiable`), chat-encoded as the stage does (`align.rl_data`). fp32 on
the CPU; every process uses ``--threads`` (2; ``--quick`` 1) torch threads.

1. Rollout throughput, side by side in one process, rounds interleaved (the order rotates each
   round), medians. 16 prompts × G=8 samples, temperature 1.0 (top-p 1, top-k off),
   64 new tokens per sample on both sides: no stop token on either side (ours: the
   `align.rollout.Generator` with its sampling params' stop ids / strings removed and
   ``ignore_eos``; transformers: no eos id, ``min_new_tokens`` = ``max_new_tokens``), so both
   generate the same number of tokens (counted, not assumed). tokens/s = generated tokens / s.

   * ours: ``Generator.generate`` — the RL stage's rollout path (paged KV cache, continuous
     batching, per-request seeds, incremental detokenisation; the first sample of each prompt
     is prefilled first, the other G-1 reuse its prompt blocks through prefix caching);
   * transformers, padded batch: the 16 × 8 = 128 rows left-padded to the longest prompt as one
     ``generate(do_sample=True, ...)`` batch (every row prefills its whole prompt);
   * transformers, ``num_return_sequences=8`` on the 16 prompts (expanded inside ``generate``).

   ``speedup_vs_hf_*`` is the median over rounds of (transformers time / our time) for the same
   token count (> 1: ours is faster); the issue's goal is ≥ 3× against the padded batch.
2. The time split of one GRPO step of the real stage: `align.rl_stage.prepare` +
   ``build_trainer`` (configs/align/grpo.yaml's algorithm settings: 16 prompts × 8 samples per
   step, 64 new tokens, the verifiable reward, ``num_iterations`` 1, ``training.batch_size`` 16 →
   8 micro-batches, AdamW, clip 1.0; ``device=cpu``, fp32; no held-out prompts), one
   unmeasured warm-up step, then ``trainer.train_step()`` steps. Per step, from the rollout
   source's own timers (`RolloutSource.pop_stats`): ``generation_reward_s`` = rollout −
   log-probs (sampling, detokenising, scoring, collating), ``logps_s`` (``time/logps_s``:
   advantages, the old / reference log-prob forwards), ``update_s`` = step − rollout (the
   micro-batch forwards + backwards, clipping, AdamW); the three add up to the step
   (``stage_generate_s_median`` repeats the stage's ``time/generate_s`` where it logs one). With ``num_iterations``
   1 no old log-probs are computed, so with ``beta: 0`` ``logps_s`` is nearly nothing.
3. Peak memory, ``beta: 0`` (no reference model at all) vs ``beta`` > 0 (``--beta``, 0.04; a
   frozen full copy of the policy, its log-probs once per rollout): each variant is its own
   worker process, so peaks do not mix; peak = ``ru_maxrss`` of that process, whole and above
   its resident set right after its imports, beside the peak of the training steps alone
   (``VmHWM`` reset through /proc/self/clear_refs once the stage is built, so the setup's
   transient copies drop out; Linux only; the reset clears ``ru_maxrss`` too, so the whole
   peak is the larger of ``ru_maxrss`` read just before it and at the end). The workers are
   started first, while this process is still small: on Linux a child's ``ru_maxrss`` starts
   at its parent's resident set (the image before ``exec`` counts), which would otherwise
   cover both peaks. They import, wait while the rollouts of part 1 are timed, are set up one
   after the other, then take turns step by step (order rotating), so the step-time split of
   both variants is measured under the same background load.

    python benchmarks/rl_speed.py [--quick] [--config A|B] [--prompts 16] [--group_size 8]
        [--new_tokens 64] [--rounds 5] [--steps 3] [--warmup 1] [--beta 0.04] [--threads 2]
        [--batch_size 16] [--no_num_return_sequences] [--out FILE.json]

``--quick``: a smoke run (a tiny model, 4 prompts × 4 samples, 16 new tokens, 3 rollout rounds,
one measured GRPO step per variant, 1 thread). Prints one JSON object on stdout (progress on stderr).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):  # run as a script: make the repo importable
    sys.path.insert(0, str(REPO))

from benchmarks.procs import (Channel, WorkerProcess, emit_report, log, parse_args_or_serve,  # noqa: E402
                              peak_rss_mb, reset_peak_rss, rotated, rss_mb, ru_maxrss_mb, status_kib,
                              take_turns)

# name: (vocab, dim, layers, heads, kv heads, ffn hidden) — benchmarks/model_speed.py; "quick" is
# the tiny shape of the tests (tests/test_sft.py TINY)
CONFIGS = {
    "A": (4096, 256, 4, 8, 4, 688),
    "B": (8192, 512, 8, 8, 8, 1376),
    "quick": (1024, 64, 2, 4, 2, 172),
}
MAX_SEQ_LEN = 256
BIG = 10**9  # "never": eval / save / log intervals
SHAPE_KEYS = ("vocab", "dim", "layers", "heads", "kv_heads", "ffn")


def median(values: list[float]) -> float:
    return statistics.median(values)


# ---------------------------------------------------------------------------- the environment
def write_tokenizer(out_dir: Path, vocab_size: int) -> int:
    """Byte-level BPE on the built-in stories (as tests/test_sft.py), padded with plain added
    tokens up to ``vocab_size``, with the chat template beside it; returns the BPE's own size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from data_pipeline.builtin.stories import generate_stories
    from data_pipeline.formats import SPECIAL_TOKENS
    from data_pipeline.tokenizer.io import write_hf_configs

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(generate_stories(200, seed=1), trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    bpe_size = tok.get_vocab_size()
    if bpe_size < vocab_size:  # the stories have fewer merges than a 4096 vocabulary: fill it up
        tok.add_tokens([f"<fill{i}>" for i in range(vocab_size - bpe_size)])
    assert tok.get_vocab_size() == vocab_size, (tok.get_vocab_size(), vocab_size)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    write_hf_configs(out_dir)
    return bpe_size


def write_prompts(path: Path, n: int, seed: int = 0) -> Path:
    """The built-in verifiable problems (the short ones, as tests/rl_fixtures.py)."""
    from data_pipeline.builtin.verifiable import generate_verifiable_prompts

    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [r for r in generate_verifiable_prompts(4 * n, seed) if r["task"] not in ("story_name", "story_color")][:n]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def build_env(root: Path, shape: tuple, n_prompts: int, seed: int) -> dict[str, Any]:
    """Tokenizer + prompts file under root/data, our checkpoint root/base, its HF export root/hf."""
    import torch

    from model import ModelConfig, build_model, count_params
    from model.hf import save_hf_dir
    from utils.checkpoint import save_checkpoint

    vocab, dim, layers, heads, kv_heads, ffn = shape
    data = root / "data"
    bpe_size = write_tokenizer(data / "tokenizer", vocab)
    write_prompts(data / "prompts" / "rl_prompts.jsonl", n_prompts, seed)
    cfg = ModelConfig(vocab_size=vocab, dim=dim, n_layers=layers, n_heads=heads, n_kv_heads=kv_heads,
                      ffn_hidden_dim=ffn, max_seq_len=MAX_SEQ_LEN)
    torch.manual_seed(seed)
    sd = build_model(cfg).state_dict()
    save_checkpoint(root / "base", sd, cfg.model_dump(mode="json"), tokenizer_dir=data / "tokenizer")
    save_hf_dir(cfg, sd, root / "hf")
    return {"root": root, "data_dir": data, "base": root / "base", "hf": root / "hf", "cfg": cfg, "state": sd,
            "bpe_vocab": bpe_size, "params": count_params(cfg)["total"]}


# ---------------------------------------------------------------------------- 1. rollout throughput
def rollout_throughput(env: dict, args) -> dict[str, Any]:
    import torch
    import transformers
    from tokenizers import Tokenizer

    from align.rl_config import RLSection, SamplingSection
    from align.rl_data import encode_prompts, read_prompts, request_seed
    from align.rollout import Generator
    from data_pipeline.chat import ChatTokenizer
    from inference.engine.sampling import SamplingParams
    from model import build_model

    P, G, N = args.prompts, args.group_size, args.new_tokens
    cfg = env["cfg"]
    file = env["data_dir"] / "tokenizer" / "tokenizer.json"
    ct = ChatTokenizer.wrap(Tokenizer.from_file(str(file)))
    path = env["data_dir"] / "prompts" / "rl_prompts.jsonl"
    prompts = encode_prompts(read_prompts(path), ct, cfg.max_seq_len - N, path)[:P]
    if len(prompts) < P:
        raise SystemExit(f"only {len(prompts)} usable prompts for --prompts {P}")

    class FixedLengthGenerator(Generator):
        """The stage's generator, sampling exactly ``max_new`` tokens (no stop ids / strings)."""

        max_new = N

        def params(self, seed: int) -> SamplingParams:
            p = super().params(seed)
            p.stop, p.stop_token_ids, p.ignore_eos, p.max_tokens = [], [], True, self.max_new
            return p

    policy = build_model(cfg)
    policy.load_state_dict(env["state"])
    policy.eval()
    rl = RLSection(prompts_per_step=P, group_size=G,
                   sampling=SamplingSection(temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=N))
    gen = FixedLengthGenerator(policy, cfg, Tokenizer.from_file(str(file)), file, ct, rl, max_num_seqs=P * G)

    hf = transformers.LlamaForCausalLM.from_pretrained(env["hf"], dtype=torch.float32,
                                                       attn_implementation="sdpa").eval()
    with torch.no_grad():  # the same function on both sides
        probe = torch.tensor([prompts[0].ids])
        diff = (policy(probe) - hf(probe).logits).abs().max().item()

    pad = ct.pad_id

    def left_pad(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for b, r in enumerate(rows):
            ids[b, width - len(r):] = torch.tensor(r)
            mask[b, width - len(r):] = 1
        return ids, mask

    batch_ids, batch_mask = left_pad([p.ids for p in prompts for _ in range(G)])  # (P*G, W)
    group_ids, group_mask = left_pad([p.ids for p in prompts])  # (P, W)

    def run_ours(n: int, round_: int) -> tuple[int, float]:
        gen.max_new = n
        seeds = [[request_seed(args.seed, "bench", round_, i, j) for j in range(G)] for i in range(P)]
        t0 = time.perf_counter()
        groups = gen.generate(prompts, G, seeds)
        dt = time.perf_counter() - t0
        return sum(len(s.completion_ids) for g in groups for s in g), dt

    @torch.inference_mode()
    def run_hf(n: int, round_: int, nrs: int) -> tuple[int, float]:
        ids, mask = (group_ids, group_mask) if nrs > 1 else (batch_ids, batch_mask)
        torch.manual_seed(round_)
        t0 = time.perf_counter()
        out = hf.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                          max_new_tokens=n, min_new_tokens=n, num_return_sequences=nrs, pad_token_id=pad)
        dt = time.perf_counter() - t0
        new = out[:, ids.shape[1]:]
        assert new.shape == (P * G, n), new.shape
        return new.numel(), dt

    sides: dict[str, Any] = {"ours": lambda n, r: run_ours(n, r), "hf_padded_batch": lambda n, r: run_hf(n, r, 1)}
    if not args.no_num_return_sequences:
        sides["hf_num_return_sequences"] = lambda n, r: run_hf(n, r, G)
    for fn in sides.values():  # warm-up: one unmeasured full-length run each
        fn(N, -1)
    times: dict[str, list[float]] = {k: [] for k in sides}
    tokens: dict[str, int] = {}
    order = list(sides)
    for r in range(args.rounds):
        for name in rotated(order, r):  # rotate who goes first
            n_tok, dt = sides[name](N, r)
            if tokens.setdefault(name, n_tok) != n_tok:
                raise RuntimeError(f"{name}: {n_tok} tokens in round {r}, {tokens[name]} before")
            times[name].append(dt)
        log(f"[rollout] round {r + 1}/{args.rounds}: " + ", ".join(f"{k} {times[k][-1]:.2f}s" for k in order))
    if len(set(tokens.values())) != 1:
        raise RuntimeError(f"the sides generated different token counts: {tokens}")
    generated = tokens["ours"]
    lens = [len(p.ids) for p in prompts]
    out: dict[str, Any] = {
        "prompts": P, "group_size": G, "rows": P * G, "max_new_tokens": N, "rounds": args.rounds,
        "generated_tokens_per_round": generated,
        "prompt_tokens": {"mean": round(statistics.mean(lens), 1), "min": min(lens), "max": max(lens),
                          "hf_padded_width": int(batch_ids.shape[1])},
        "logits_max_abs_diff_ours_vs_transformers": float(f"{diff:.3g}"),
        "tokens_per_s": {k: round(generated / median(v), 1) for k, v in times.items()},
        "seconds_median": {k: round(median(v), 4) for k, v in times.items()},
        "seconds_all": {k: [round(x, 4) for x in v] for k, v in times.items()},
    }
    for k in sides:
        if k != "ours":
            ratios = [t / o for o, t in zip(times["ours"], times[k])]
            out[f"speedup_vs_{k}"] = round(median(ratios), 3)
            out[f"speedup_vs_{k}_per_round"] = [round(x, 3) for x in ratios]
    out["goal_speedup_vs_hf_padded_batch_ge_3x"] = out["speedup_vs_hf_padded_batch"] >= 3.0
    return out


# ---------------------------------------------------------------------------- 2./3. GRPO step workers
def stage_config(spec: dict, beta: float) -> dict:
    """configs/align/grpo.yaml's algorithm settings, sized by the spec, on the benchmark's files."""
    return {
        "stage": "rl",
        "rl": {"algorithm": "grpo", "val_prompts": 0, "prompts_per_step": spec["prompts"],
               "group_size": spec["group_size"],
               "sampling": {"temperature": 1.0, "top_p": 1.0, "max_new_tokens": spec["new_tokens"]},
               "rewards": [{"type": "verifiable", "weight": 1.0}], "scale_rewards": "group", "epsilon": 0.2,
               "epsilon_high": 0.28, "beta": beta, "num_iterations": 1, "loss_aggregation": "token_mean"},
        "data": {"data_dir": spec["data_dir"]},
        "training": {"batch_size": spec["batch_size"], "max_steps": BIG, "learning_rate": 5e-4,
                     "weight_decay": 0.0, "warmup_steps": 0, "lr_schedule": "constant", "grad_clip": 1.0,
                     "device": "cpu", "dtype": "fp32", "seed": spec["seed"], "eval_interval": BIG},
        "logging": {"runs_dir": spec["runs_dir"], "run_name": f"beta_{beta:g}", "log_interval": BIG},
        "checkpointing": {"init_from": spec["base"], "save_interval": BIG},
    }


def worker_main(beta_text: str, threads_text: str) -> None:
    chan = Channel()
    try:
        _worker(float(beta_text), int(threads_text), chan)
    except BaseException as e:  # noqa: BLE001 — reported to the coordinator, then re-raised
        chan.send({"event": "error", "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()})
        raise


def _worker(beta: float, threads: int, chan: Channel) -> None:
    t_start = time.perf_counter()
    import torch

    torch.set_num_threads(threads)
    from align import rl_stage
    from align.rl_config import RLConfig
    from trainer.launch import launch
    from utils.config import validate

    rss_imports = rss_mb()
    chan.send({"event": "imported", "imports_s": time.perf_counter() - t_start})
    cmd = chan.receive()
    if cmd["cmd"] != "setup":
        return
    spec = cmd["spec"]
    cfg = validate(stage_config(spec, beta), RLConfig)
    t0 = time.perf_counter()
    source, method = rl_stage.prepare(cfg)
    with launch(cfg) as dist:
        trainer = rl_stage.build_trainer(cfg, method, source, dist)
        trainer.model.train()  # as `Trainer.fit` does
        ready = {"event": "ready", "setup_s": time.perf_counter() - t0, "rss_after_imports_mb": rss_imports,
                 "peak_rss_setup_mb": peak_rss_mb(), "rss_at_ready_mb": rss_mb(),
                 "ru_maxrss_at_ready_mb": ru_maxrss_mb(),
                 "reference": cfg.rl.reference if beta else "none",
                 "grad_accum_steps": cfg.training.grad_accum_steps,
                 "trainable_params": sum(p.numel() for p in trainer.params)}
        steps_peak = reset_peak_rss()  # from here VmHWM and ru_maxrss: the training steps' peak
        chan.send(ready)
        while True:
            cmd = chan.receive()
            if cmd["cmd"] == "stop":
                break
            steps = []
            for _ in range(cmd["n"]):
                t = time.perf_counter()
                stats = trainer.train_step()
                step_s = time.perf_counter() - t
                roll = trainer.train_data.pop_stats()  # this step's rollout (num_iterations 1)
                steps.append({"step_s": step_s, "rollout_s": roll["time/rollout_s"],
                              "logps_s": roll["time/logps_s"], "generate_s": roll.get("time/generate_s"),
                              "completion_length": roll["completion_length"], "loss": stats["loss"]})
            chan.send({"event": "steps", "steps": steps})
        hwm = status_kib("VmHWM")
        chan.send({"event": "done", "ru_maxrss_mb": ru_maxrss_mb(), "rss_end_mb": rss_mb(),
                   "peak_rss_steps_mb": hwm / 1024 if steps_peak and hwm else None,
                   "threads": torch.get_num_threads()})


class Worker(WorkerProcess):
    """A worker process of one variant: it imports at once, then waits for its spec (`setup`)."""

    def __init__(self, name: str, beta: float, log_path: Path, threads: int) -> None:
        super().__init__(name, __file__, [repr(beta), str(threads)], log_path, threads)
        self.steps: list[dict[str, float]] = []

    def wait_imported(self) -> None:
        self.update_info()

    def setup(self, spec: dict) -> None:
        self.send({"cmd": "setup", "spec": spec})
        self.update_info()

    def run(self, n: int, measured: bool) -> None:
        self.send({"cmd": "run", "n": n})
        steps = self.read()["steps"]
        if measured:
            self.steps += steps


def start_workers(args, tmp: Path) -> dict[str, Worker]:
    """Both variants' workers, started (and their imports done, one after the other) while this
    process is still small: on Linux a child's ``ru_maxrss`` starts at its parent's resident set
    at the fork (the pre-exec image counts), which would otherwise hide the peaks compared."""
    workers: dict[str, Worker] = {}
    try:
        for name, beta in (("beta_0", 0.0), (f"beta_{args.beta:g}", args.beta)):
            workers[name] = Worker(name, beta, tmp / f"{name}.log", args.threads)
            workers[name].wait_imported()
    except BaseException:
        for w in workers.values():
            w.kill()
        raise
    return workers


def summarise(w: Worker, rows: int) -> dict[str, Any]:
    s = w.steps
    split = {
        "step_s": [x["step_s"] for x in s],
        "generation_reward_s": [x["rollout_s"] - x["logps_s"] for x in s],
        "logps_s": [x["logps_s"] for x in s],
        "update_s": [x["step_s"] - x["rollout_s"] for x in s],
    }
    med = {k: median(v) for k, v in split.items()}
    info = w.info
    stage_generate = [x["generate_s"] for x in s if x.get("generate_s") is not None]
    out: dict[str, Any] = {
        "reference": info["reference"], "steps_measured": len(s),
        **{f"{k}_median": round(v, 4) for k, v in med.items()},
        "fraction_of_step": {k: round(med[k] / med["step_s"], 3)
                             for k in ("generation_reward_s", "logps_s", "update_s")},
        "all_steps": {k: [round(x, 4) for x in v] for k, v in split.items()},
        "completion_length_mean": round(statistics.mean(x["completion_length"] for x in s), 2),
        "generated_tokens_per_s_in_step": round(
            rows * statistics.mean(x["completion_length"] for x in s) / med["generation_reward_s"], 1),
        "grad_accum_steps": info["grad_accum_steps"], "trainable_params": info["trainable_params"],
        "setup_s": round(info["setup_s"], 2),
        "rss_after_imports_mb": round(info["rss_after_imports_mb"], 1),
        "peak_rss_setup_mb": round(info["peak_rss_setup_mb"], 1),
        "rss_at_ready_mb": round(info["rss_at_ready_mb"], 1),
        "peak_rss_steps_mb": None if info["peak_rss_steps_mb"] is None else round(info["peak_rss_steps_mb"], 1),
        "rss_end_mb": round(info["rss_end_mb"], 1),
    }
    if stage_generate:  # the stage's own sampling + scoring timer, where it has one (time/generate_s)
        out["stage_generate_s_median"] = round(median(stage_generate), 4)
    # the whole life's peak: ru_maxrss before the reset (imports + setup) and at the end (the steps)
    # (VmHWM and ru_maxrss are read at different moments and rounded apart: take the largest of all)
    peaks = [info["ru_maxrss_at_ready_mb"], info["ru_maxrss_mb"], info["peak_rss_setup_mb"],
             info["peak_rss_steps_mb"] or 0.0]
    out["peak_rss_mb"] = round(max(peaks), 1)
    out["peak_rss_above_imports_mb"] = round(out["peak_rss_mb"] - out["rss_after_imports_mb"], 1)
    return out


def grpo_steps(workers: dict[str, Worker], env: dict, args, tmp: Path) -> dict[str, Any]:
    spec = {"data_dir": str(env["data_dir"]), "base": str(env["base"]), "runs_dir": str(tmp / "runs"),
            "prompts": args.prompts, "group_size": args.group_size, "new_tokens": args.new_tokens,
            "batch_size": args.batch_size, "seed": args.seed}
    try:
        for name, w in workers.items():  # set up one at a time: setups never overlap
            log(f"[grpo] setting up {name} ...")
            w.setup(spec)
        log(f"[grpo] warm-up: {args.warmup} step(s) each; then {args.steps} step(s) each, taking turns")
        order = list(workers.values())

        def progress(r: int) -> None:
            log(f"[grpo] step {r + 1}/{args.steps}: " + ", ".join(
                f"{w.name} {w.steps[-1]['step_s']:.2f}s (rollout {w.steps[-1]['rollout_s']:.2f}s)" for w in order))

        take_turns(order, args.warmup, args.steps, 1, progress)
    finally:
        for w in workers.values():
            w.kill()
    res = {name: summarise(w, args.prompts * args.group_size) for name, w in workers.items()}
    off, on = res["beta_0"], res[f"beta_{args.beta:g}"]
    ref_mb = env["params"] * 4 / 2**20
    memory = {
        "beta_0_peak_rss_mb": off["peak_rss_mb"], f"beta_{args.beta:g}_peak_rss_mb": on["peak_rss_mb"],
        "peak_rss_ratio_beta_over_beta_0": round(on["peak_rss_mb"] / off["peak_rss_mb"], 3),
        "peak_rss_above_imports_ratio": round(on["peak_rss_above_imports_mb"] / off["peak_rss_above_imports_mb"], 3),
        "peak_rss_difference_mb": round(on["peak_rss_mb"] - off["peak_rss_mb"], 1),
        "reference_weights_fp32_mb": round(ref_mb, 1),
    }
    if off["peak_rss_steps_mb"] and on["peak_rss_steps_mb"]:  # the training steps alone (Linux)
        memory["steps_only_peak_rss_ratio"] = round(on["peak_rss_steps_mb"] / off["peak_rss_steps_mb"], 3)
        memory["steps_only_peak_rss_difference_mb"] = round(on["peak_rss_steps_mb"] - off["peak_rss_steps_mb"], 1)
    config = {"algorithm": "grpo", "prompts_per_step": args.prompts, "group_size": args.group_size,
              "max_new_tokens": args.new_tokens, "num_iterations": 1, "batch_size": args.batch_size,
              "reward": "verifiable", "warmup_steps": args.warmup, "measured_steps": args.steps, "beta": args.beta}
    return {"config": config, "variants": res, "peak_rss": memory}


# ---------------------------------------------------------------------------- main
def main() -> None:
    p = argparse.ArgumentParser(description="online RL: rollout tokens/s vs transformers generate, GRPO step "
                                            "time split, peak memory with / without a reference")
    p.add_argument("--config", default="A", choices=["A", "B"], help="model shape (benchmarks/model_speed.py)")
    p.add_argument("--quick", action="store_true", help="a smoke run: tiny model, 4 prompts x 4 samples, "
                                                        "16 tokens, 3 rounds, 1 measured GRPO step")
    p.add_argument("--prompts", type=int, default=None, help="prompts per rollout (default 16; quick 4)")
    p.add_argument("--group_size", type=int, default=None, help="samples per prompt G (default 8; quick 4)")
    p.add_argument("--new_tokens", type=int, default=None, help="new tokens per sample (default 64; quick 16)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rollout rounds (default 5; quick 3)")
    p.add_argument("--steps", type=int, default=None, help="measured GRPO steps per variant (default 3; quick 1)")
    p.add_argument("--warmup", type=int, default=1, help="unmeasured GRPO steps per variant first")
    p.add_argument("--beta", type=float, default=0.04, help="the KL coefficient of the variant with a reference")
    p.add_argument("--batch_size", type=int, default=16, help="training.batch_size (sequences per micro-batch)")
    p.add_argument("--threads", type=int, default=None, help="torch threads of every process (default 2; quick 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no_num_return_sequences", action="store_true",
                   help="skip the transformers num_return_sequences variant")
    p.add_argument("--out", default=None, help="also write the JSON here")
    args = parse_args_or_serve(p, worker_main, "BETA", "THREADS")
    if args is None:  # this was a worker
        return
    q = args.quick
    args.prompts = args.prompts or (4 if q else 16)
    args.group_size = args.group_size or (4 if q else 8)
    args.new_tokens = args.new_tokens or (16 if q else 64)
    args.rounds = args.rounds or (3 if q else 5)
    args.steps = args.steps or (1 if q else 3)
    args.threads = args.threads or (1 if q else 2)
    if args.beta <= 0:
        p.error("--beta must be > 0 (the variant with a reference model; beta 0 is always measured)")
    if args.group_size < 2:
        p.error("--group_size must be at least 2 (GRPO's group baseline)")
    shape = CONFIGS["quick" if q else args.config]

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    t0 = time.perf_counter()
    loadavg_start = [round(x, 2) for x in os.getloadavg()]  # other work on the machine adds noise
    with tempfile.TemporaryDirectory(prefix="rl_speed_") as tmp_name:
        tmp = Path(tmp_name)
        log("[grpo] starting the workers (beta 0 and beta > 0) ...")
        workers = start_workers(args, tmp)  # before this process loads torch (see start_workers)
        try:
            import torch
            import transformers

            torch.set_num_threads(args.threads)
            transformers.logging.set_verbosity_error()
            transformers.logging.disable_progress_bar()
            report: dict[str, Any] = {
                "benchmark": "rl_speed", "device": "cpu", "dtype": "float32", "threads": torch.get_num_threads(),
                "torch": torch.__version__, "transformers": transformers.__version__, "quick": q,
                "config": "quick" if q else args.config, "shape": dict(zip(SHAPE_KEYS, shape)),
                "max_seq_len": MAX_SEQ_LEN, "command": " ".join([Path(sys.executable).name, *sys.argv]),
                "loadavg_start": loadavg_start,
            }
            steps_total = args.warmup + args.steps
            env = build_env(tmp, shape, n_prompts=args.prompts * steps_total + 8, seed=args.seed)
            report["params"] = env["params"]
            report["tokenizer"] = {"vocab": shape[0], "bpe_tokens": env["bpe_vocab"],
                                   "added_fill_tokens": shape[0] - env["bpe_vocab"]}
            log(f"[rollout] {args.prompts} prompts x {args.group_size} samples x {args.new_tokens} tokens, "
                f"{args.rounds} rounds")
            report["rollout"] = rollout_throughput(env, args)
            report["grpo_step"] = grpo_steps(workers, env, args, tmp)
        finally:
            for w in workers.values():
                w.kill()
    report["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    report["wall_s"] = round(time.perf_counter() - t0, 1)
    emit_report(report, args.out)


if __name__ == "__main__":
    main()
