"""DPO optimizer steps per second and peak memory: our alignment stage vs TRL's `DPOTrainer`.

Both sides train the same random Llama (configs A / B of `benchmarks/model_speed.py`, built by
`model.build_model`, exported with `model.hf.save_hf_dir` and loaded by transformers as fp32
``AutoModelForCausalLM``) on the same preference pairs, in the same order, with the same
batch size, AdamW (lr, betas, eps, weight decay 0), sigmoid DPO loss, β, constant LR,
gradient clipping at 1.0, fp32, no gradient checkpointing. One step = draw the batch,
policy forward + backward over the chosen and rejected rows, the reference log-probs,
clip, AdamW, zero grad.

* Pairs: random token ids with uneven lengths (prompt 32–96, each response 64–160 tokens;
  seeded), written as preference bins with `data_pipeline.formats.TokenBinWriter`, beside a
  word-level tokenizer whose vocabulary is the model's (the stage checks its hash and chat
  template; nothing is ever tokenised).
* Ours: the real stage code path: `align.stage.prepare` + `build_trainer` (bins →
  `PreferenceLoader`, `PreferenceObjective`, the reference of `align.reference`, the engine's
  `Trainer` / `AdapterTrainer`), then ``trainer.train_step()`` — the engine's optimizer step,
  data drawing included — timed step by step. Variants: ``reference: frozen`` (a second
  model), ``precompute`` (a table computed once before training), ``adapters_off`` (LoRA r=8,
  α=16 on every attention / FFN linear; the reference is the base with adapters off).
* TRL: a real ``trl.DPOTrainer`` (its `DataCollatorForPreference`, fused LM head, metrics) on
  a pre-tokenised ``datasets.Dataset`` (prompt_ids / chosen_ids / rejected_ids) holding our
  loader's batches in our loader's order (``train_sampling_strategy="sequential"``), so step i
  sees the same pairs on both sides. Variants: ``ref_model`` a second copy (frozen),
  ``precompute_ref_log_probs=True``, and a PEFT LoRA with the same r / α / targets (reference
  = adapters disabled). The only override: `_prepare_dataset` returns an already tokenised
  dataset unchanged (TRL 1.16 would otherwise try to extract text prompts from it), and the
  reference precompute is timed. A callback times each step as the interval between
  consecutive ``on_step_end`` calls, so it covers batch fetch + collate + step, like ours.

Each variant runs in its own worker process, so peaks do not mix: peak memory is that
process's peak resident set (``VmHWM``; ``ru_maxrss`` is reported beside it), whole and above
the process's resident set right after its imports (the imports differ: TRL loads
transformers, datasets, accelerate, peft). By default glibc keeps freed tensor memory mapped,
so the peak includes its cache; ``--malloc_mmap_threshold 131072`` makes freed tensors leave
the resident set, so the peak follows the live tensors (slower steps: a memory-only run).
Workers are set up one at a time (setup and the reference precompute are reported separately,
never in steps/s), then take turns: warm-up steps, then rounds in which each worker runs one
step (``--rounds`` fewer: several) while the others wait, the order rotating each round, so
background load hits all alike. Every worker uses ``--threads`` (2) torch threads. Step i
has the same batch on both sides, so each round gives a ratio TRL time / our time of the same
batch run back to back; ``speedup_ours_vs_trl`` is their median (> 1: ours is faster; robust
to bursts of other load, which slow 2-thread OpenMP kernels many times over), and
``speedup_total_time`` = Σ TRL step times / Σ ours. The reward margins of every step are
compared between the sides: they agree to ~1e-5, so both train the same thing.

    python benchmarks/preference_speed.py [--config A|B|A,B] [--quick] [--steps N] [--warmup N]
        [--batch_size 4] [--pairs 32] [--variants frozen,precompute,lora] [--sides ours,trl]
        [--threads 2] [--malloc_mmap_threshold BYTES] [--out FILE.json]

Prints one JSON object on stdout and a short table on stderr.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

REPO = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):  # run as a script: make the repo importable
    sys.path.insert(0, str(REPO))

from benchmarks.procs import (Channel, WorkerProcess, emit_report, log, parse_args_or_serve,  # noqa: E402
                              peak_rss_mb, rss_mb, ru_maxrss_mb, take_turns)

# name: (vocab, dim, layers, heads, kv heads, ffn hidden, max seq len) — configs A and B of
# benchmarks/model_speed.py (its seq len is the model's max_seq_len here)
CONFIGS = {
    "A": (4096, 256, 4, 8, 4, 688, 256),
    "B": (8192, 512, 8, 8, 8, 1376, 512),
}
PROMPT_LEN = (32, 96)     # inclusive ranges of the random pairs' lengths
RESPONSE_LEN = (64, 160)
REFERENCES = {"frozen": "frozen", "precompute": "precompute", "lora": "adapters_off"}
LORA = dict(r=8, alpha=16.0, targets=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
BIG = 10**9  # "never": eval / save / log intervals


# ---------------------------------------------------------------------------- worker side
def run_chunk(n: int, step: Callable[[], float]) -> dict:
    times, margins = [], []
    for _ in range(n):
        t0 = time.perf_counter()
        margin = step()
        times.append(time.perf_counter() - t0)
        margins.append(margin)
    return {"times": times, "margins": margins}


def describe_optimizer(opt) -> str:
    """e.g. ``AdamW(fused)``: the class and kernel flavour of the (unwrapped) optimizer."""
    opt = getattr(opt, "optimizer", opt)  # accelerate's AcceleratedOptimizer wraps the real one
    d = opt.defaults
    flavour = "fused" if d.get("fused") else "foreach" if d.get("foreach") else "for-loop" if "foreach" in d else ""
    return f"{type(opt).__name__}({flavour})" if flavour else type(opt).__name__


def final_stats(extra: dict) -> dict:
    import torch

    return {"event": "done", "peak_rss_mb": peak_rss_mb(), "rss_end_mb": rss_mb(),
            "ru_maxrss_mb": ru_maxrss_mb(),
            "threads": torch.get_num_threads(), **extra}


def ours_config(spec: dict, kind: str) -> dict:
    cfg: dict[str, Any] = {
        "data": {"data_dir": spec["data_dir"]},
        "training": {"batch_size": spec["batch_size"], "max_steps": spec["max_steps"],
                     "learning_rate": spec["lr"], "weight_decay": 0.0, "beta1": spec["betas"][0],
                     "beta2": spec["betas"][1], "eps": spec["eps"], "grad_clip": spec["grad_clip"],
                     "lr_schedule": "constant", "warmup_steps": 0, "device": "cpu", "dtype": "fp32",
                     "seed": spec["seed"], "eval_interval": BIG, "eval_steps": 1},
        "logging": {"runs_dir": spec["runs_dir"], "run_name": f"ours_{kind}", "log_interval": BIG},
        "checkpointing": {"init_from": spec["hf_dir"], "save_interval": BIG},
        "align": {"method": "dpo", "beta": spec["beta"], "loss_type": "sigmoid", "reference": REFERENCES[kind]},
    }
    if kind == "lora":
        cfg["lora"] = {"r": LORA["r"], "alpha": LORA["alpha"]}
    return cfg


def ours_worker(spec: dict, kind: str, chan: Channel) -> None:
    t_start = time.perf_counter()
    import torch

    torch.set_num_threads(spec["threads"])
    from align import stage
    from align.config import AlignConfig
    from trainer.launch import launch
    from utils.config import validate

    rss_imports = rss_mb()
    timing: dict[str, float] = {}
    build_reference = stage.build_reference

    def timed_reference(*args, **kwargs):  # the frozen copy's build, or the precompute pass
        t0 = time.perf_counter()
        ref = build_reference(*args, **kwargs)
        timing["reference_setup_s"] = time.perf_counter() - t0
        return ref

    stage.build_reference = timed_reference
    cfg = validate(ours_config(spec, kind), AlignConfig)
    t0 = time.perf_counter()
    source, method = stage.prepare(cfg, reward=False)
    with launch(cfg) as dist:
        trainer = stage.build_trainer(cfg, method, source, dist, reward=False)
        trainer.model.train()  # as `Trainer.fit` does
        trainer.ckpt.clean_stale()
        n_train = len(trainer.train_data.bin)
        chan.send({"event": "ready", "setup_s": time.perf_counter() - t0,
                   "start_to_ready_s": time.perf_counter() - t_start,
                   "rss_after_imports_mb": rss_imports, "peak_rss_ready_mb": peak_rss_mb(),
                   "trainable_params": sum(p.numel() for p in trainer.params),
                   "optimizer": describe_optimizer(trainer.optimizer),
                   "activation_checkpointing": cfg.training.activation_checkpointing,
                   "precomputed_pairs": n_train + spec["n_val"] if kind == "precompute" else 0, **timing})

        def step() -> float:
            stats = trainer.train_step()
            return stats["sums"]["rewards/margins"]

        while True:
            cmd = chan.receive()
            if cmd["cmd"] == "stop":
                break
            chan.send({"event": "chunk", **run_chunk(cmd["n"], step)})
        chan.send(final_stats({"skipped_steps": trainer.guard.skipped_total}))


def trl_worker(spec: dict, kind: str, chan: Channel) -> None:
    t_start = time.perf_counter()
    os.environ.setdefault("TQDM_DISABLE", "1")
    import torch

    torch.set_num_threads(spec["threads"])
    import datasets
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    rss_imports = rss_mb()
    timing: dict[str, float] = {}
    t0 = time.perf_counter()

    class BenchDPOTrainer(DPOTrainer):
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            if "prompt_ids" in dataset.column_names:  # already tokenised: the columns the collator reads
                return dataset
            return super()._prepare_dataset(dataset, processing_class, args, dataset_name)

        def _precompute_ref_logps(self, dataset, name, batch_size):
            t = time.perf_counter()
            out = super()._precompute_ref_logps(dataset, name, batch_size)
            timing["reference_setup_s"] = timing.get("reference_setup_s", 0.0) + time.perf_counter() - t
            return out

    class Driver(TrainerCallback):
        """Hands control to the coordinator: ready at train begin, then `n` steps per command."""

        trainer: Any = None

        def __init__(self) -> None:
            self.left, self.mark, self.times, self.margins = 0, 0.0, [], []

        def _next(self, control) -> None:
            cmd = chan.receive()
            if cmd["cmd"] == "stop":
                control.should_training_stop = True
                return
            self.left, self.times, self.margins = cmd["n"], [], []
            self.mark = time.perf_counter()

        def on_train_begin(self, args, state, control, **kwargs):
            model = self.trainer.model
            chan.send({"event": "ready", "setup_s": time.perf_counter() - t0,
                       "start_to_ready_s": time.perf_counter() - t_start,
                       "rss_after_imports_mb": rss_imports, "peak_rss_ready_mb": peak_rss_mb(),
                       "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
                       "precomputed_pairs": len(rows["prompt_ids"]) if kind == "precompute" else 0,
                       "optimizer": describe_optimizer(self.trainer.optimizer),
                       "activation_checkpointing": bool(getattr(self.trainer.model, "is_activation_checkpointing",
                                                                None)),
                       **timing})
            self._next(control)

        def on_step_end(self, args, state, control, **kwargs):
            now = time.perf_counter()
            self.times.append(now - self.mark)
            self.margins.append(self.trainer._metrics["train"]["rewards/margins"][-1])
            self.left -= 1
            self.mark = now
            if self.left == 0:
                chan.send({"event": "chunk", "times": self.times, "margins": self.margins})
                self._next(control)

    rows = json.loads(Path(spec["trl_rows"]).read_text())
    dataset = datasets.Dataset.from_dict(rows)
    tokenizer = AutoTokenizer.from_pretrained(spec["tokenizer_dir"])
    model = AutoModelForCausalLM.from_pretrained(spec["hf_dir"], dtype=torch.float32)
    ref_model = AutoModelForCausalLM.from_pretrained(spec["hf_dir"], dtype=torch.float32) if kind == "frozen" else None
    peft_config = None
    if kind == "lora":
        from peft import LoraConfig

        peft_config = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=0.0,
                                 target_modules=LORA["targets"], task_type="CAUSAL_LM")
    # TRL defaults to bf16 and gradient checkpointing: both off, like ours (transformers 5 renamed the latter)
    no_ckpt = ({"activation_checkpointing": False} if "activation_checkpointing" in DPOConfig.__dataclass_fields__
               else {"gradient_checkpointing": False})
    args = DPOConfig(
        output_dir=str(Path(spec["runs_dir"]) / f"trl_{kind}"), report_to="none", use_cpu=True,
        bf16=False, fp16=False, **no_ckpt,
        per_device_train_batch_size=spec["batch_size"], gradient_accumulation_steps=1, max_steps=spec["max_steps"],
        learning_rate=spec["lr"], adam_beta1=spec["betas"][0], adam_beta2=spec["betas"][1],
        adam_epsilon=spec["eps"], weight_decay=0.0, max_grad_norm=spec["grad_clip"],
        lr_scheduler_type="constant", warmup_steps=0, beta=spec["beta"], loss_type=["sigmoid"],
        precompute_ref_log_probs=kind == "precompute", train_sampling_strategy="sequential",
        logging_strategy="no", save_strategy="no", eval_strategy="no", disable_tqdm=True,
        dataloader_num_workers=0, dataloader_pin_memory=False, seed=spec["seed"],
    )
    driver = Driver()
    trainer = BenchDPOTrainer(model=model, ref_model=ref_model, args=args, train_dataset=dataset,
                              processing_class=tokenizer, peft_config=peft_config, callbacks=[driver])
    driver.trainer = trainer
    trainer.train()
    chan.send(final_stats({}))


def worker_main(spec_path: str, variant: str) -> None:
    chan = Channel()
    spec = json.loads(Path(spec_path).read_text())
    side, kind = variant.split("_", 1)
    try:
        (ours_worker if side == "ours" else trl_worker)(spec, kind, chan)
    except BaseException as e:
        import traceback

        traceback.print_exc()
        chan.send({"event": "error", "error": f"{type(e).__name__}: {e}"})
        raise SystemExit(1)


# ---------------------------------------------------------------------------- coordinator side
class Worker(WorkerProcess):
    def __init__(self, variant: str, spec_path: Path, log_path: Path, threads: int,
                 mmap_threshold: Optional[int] = None) -> None:
        env = {"TQDM_DISABLE": "1"}
        if mmap_threshold:  # glibc: blocks above it are mmapped, so freed tensors leave the resident set
            env["MALLOC_MMAP_THRESHOLD_"] = str(mmap_threshold)
        super().__init__(variant, __file__, [str(spec_path), variant], log_path, threads, env)
        self.times: list[float] = []
        self.margins: list[float] = []
        self.warmup_margins: list[float] = []
        self.rounds: list[float] = []  # summed step time of each round

    def wait_ready(self) -> None:
        self.update_info()

    def run(self, n: int, measured: bool) -> None:
        self.send({"cmd": "run", "n": n})
        msg = self.read()
        if measured:
            self.times += msg["times"]
            self.margins += msg["margins"]
            self.rounds.append(sum(msg["times"]))
        else:
            self.warmup_margins += msg["margins"]


def write_tokenizer(out_dir: Path, vocab_size: int) -> None:
    """A word-level tokenizer over the whole model vocabulary (the special tokens first), with
    the project's chat template: what the stage checks; the random ids are never decoded."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from data_pipeline.formats import SPECIAL_TOKENS
    from data_pipeline.tokenizer.io import write_hf_configs

    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    vocab.update({f"t{i}": i for i in range(len(SPECIAL_TOKENS), vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token=SPECIAL_TOKENS[0]))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(SPECIAL_TOKENS)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    write_hf_configs(out_dir)


def random_pairs(n: int, vocab: int, low: int, seed: int) -> list[list[list[int]]]:
    import numpy as np

    rng = np.random.default_rng(seed)
    pairs = []
    for _ in range(n):
        lens = [rng.integers(PROMPT_LEN[0], PROMPT_LEN[1] + 1)] + list(rng.integers(RESPONSE_LEN[0],
                                                                                    RESPONSE_LEN[1] + 1, 2))
        pairs.append([rng.integers(low, vocab, int(k)).tolist() for k in lens])
    return pairs


def write_bins(data_dir: Path, splits: dict[str, list], vocab: int, tok_hash: str) -> None:
    from data_pipeline.formats import COMMANDS, SPECIAL_TOKENS, TokenBinWriter, token_dtype

    for split, pairs in splits.items():
        with TokenBinWriter(data_dir / "preference" / split, token_dtype(vocab), parts_per_item=3) as w:
            for p in pairs:
                w.add(p)
            w.close(kind="preference", vocab_size=vocab, tokenizer_hash=tok_hash, eos_id=0,
                    pad_id=SPECIAL_TOKENS.index("<|pad|>"), created_by=COMMANDS["preference"], stats={},
                    source={"input": "benchmarks/preference_speed.py random pairs", "split": split,
                            "prompt_len": PROMPT_LEN, "response_len": RESPONSE_LEN})


def prepare_assets(name: str, tmp: Path, args, n_steps_total: int) -> tuple[Path, dict]:
    """Weights (HF dir), tokenizer, bins and TRL's rows for config `name`; returns the spec path."""
    import numpy as np
    import torch

    from data_pipeline.chat_loaders import PreferenceLoader
    from data_pipeline.formats import SPECIAL_TOKENS
    from data_pipeline.tokenizer.io import tokenizer_hash
    from model import ModelConfig, build_model, count_params
    from model.hf import save_hf_dir

    vocab, dim, layers, heads, kv_heads, ffn, max_len = CONFIGS[name]
    root = tmp / name
    cfg = ModelConfig(vocab_size=vocab, dim=dim, n_layers=layers, n_heads=heads, n_kv_heads=kv_heads,
                      ffn_hidden_dim=ffn, max_seq_len=max_len)
    torch.manual_seed(args.seed)
    ours = build_model(cfg).eval()
    hf_dir = save_hf_dir(cfg, ours.state_dict(), root / "hf")
    data_dir = root / "data"
    write_tokenizer(data_dir / "tokenizer", vocab)
    tok_hash = tokenizer_hash(data_dir / "tokenizer")
    pairs = random_pairs(args.pairs + args.batch_size, vocab, len(SPECIAL_TOKENS), args.seed)
    write_bins(data_dir, {"train": pairs[:args.pairs], "val": pairs[args.pairs:]}, vocab, tok_hash)

    # the batches our loader will serve, in order: TRL gets the same rows, read sequentially
    loader = PreferenceLoader(data_dir / "preference" / "train", batch_size=args.batch_size, seed=args.seed,
                              shuffle=True, vocab_size=vocab, tokenizer_hash=tok_hash)
    order, tokens = [], []
    for _ in range(n_steps_total):
        batch = next(loader)
        order += batch["pair_ids"].tolist()
        tokens.append(int(batch["chosen_attention_mask"].sum() + batch["rejected_attention_mask"].sum()))
    rows = {k: [pairs[i][j] for i in order] for j, k in enumerate(("prompt_ids", "chosen_ids", "rejected_ids"))}
    (root / "trl_rows.json").write_text(json.dumps(rows))

    # both sides hold the same function: our model vs transformers on the exported directory
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    probe = torch.tensor([pairs[0][0] + pairs[0][1]])
    with torch.no_grad():
        diff = (ours(probe) - hf(probe).logits).abs().max().item()
    del hf, ours

    spec = {"hf_dir": str(hf_dir), "data_dir": str(data_dir), "tokenizer_dir": str(data_dir / "tokenizer"),
            "runs_dir": str(root / "runs"), "trl_rows": str(root / "trl_rows.json"), "batch_size": args.batch_size,
            "max_steps": n_steps_total, "lr": args.lr, "betas": [0.9, 0.999], "eps": 1e-8, "grad_clip": 1.0,
            "beta": args.beta, "seed": args.seed, "threads": args.threads, "n_val": args.batch_size}
    spec_path = root / "spec.json"
    spec_path.write_text(json.dumps(spec, indent=2))
    lens = np.array([[len(p) for p in pair] for pair in pairs[:args.pairs]])
    meta = {
        "shape": dict(zip(("vocab", "dim", "layers", "heads", "kv_heads", "ffn", "max_seq_len"), CONFIGS[name])),
        "params": count_params(cfg)["total"],
        "logits_max_abs_diff_ours_vs_transformers": diff,
        "pairs": {"train": args.pairs, "val": args.batch_size, "prompt_len": list(PROMPT_LEN),
                  "response_len": list(RESPONSE_LEN), "mean_prompt_len": round(float(lens[:, 0].mean()), 1),
                  "mean_response_len": round(float(lens[:, 1:].mean()), 1)},
        "real_tokens_per_step_mean": round(statistics.mean(tokens), 1),
    }
    return spec_path, meta


def summarise(w: Worker) -> dict:
    t = w.times
    info = {k: v for k, v in w.info.items() if k != "event"}
    out = {
        "steps_measured": len(t),
        "steps_per_s": round(len(t) / sum(t), 4),
        "step_s_mean": round(sum(t) / len(t), 4),
        "step_s_median": round(statistics.median(t), 4),
        "step_s_min": round(min(t), 4),
        "step_s_all": [round(x, 4) for x in t],
        "setup_s": round(info.pop("setup_s"), 2),
        "reference_setup_s": round(info.pop("reference_setup_s", 0.0), 2),
        "peak_rss_mb": round(info.pop("peak_rss_mb"), 1),
        "rss_after_imports_mb": round(info.pop("rss_after_imports_mb"), 1),
        "peak_rss_at_ready_mb": round(info.pop("peak_rss_ready_mb"), 1),
    }
    out["peak_rss_above_imports_mb"] = round(out["peak_rss_mb"] - out["rss_after_imports_mb"], 1)
    if info.get("precomputed_pairs"):
        out["precompute_pairs_per_s"] = round(info["precomputed_pairs"] / out["reference_setup_s"], 2)
    for k in ("ru_maxrss_mb", "rss_end_mb", "start_to_ready_s"):
        if k in info:
            info[k] = round(info[k], 2)
    return {**out, **info}


def compare(ours: Worker, trl: Worker, same_init: bool) -> dict:
    per_round = [t / o for o, t in zip(ours.rounds, trl.rounds)]
    n = min(len(ours.margins), len(trl.margins))
    m_ours, m_trl = ours.warmup_margins + ours.margins[:n], trl.warmup_margins + trl.margins[:n]
    out = {
        # per round the two ran the same batch back to back: the median ratio shrugs off bursts of load
        "speedup_ours_vs_trl": round(statistics.median(per_round), 3),
        "speedup_total_time": round(sum(trl.times) / sum(ours.times), 3),
        "speedup_per_round": [round(r, 3) for r in per_round],
        "reward_margin_max_abs_diff": float(f"{max(abs(a - b) for a, b in zip(m_ours, m_trl)):.3g}"),
        "reward_margin_max_abs": float(f"{max(abs(a) for a in m_ours + m_trl):.3g}"),
    }
    if not same_init:
        out["note"] = "LoRA A matrices are initialised by different RNG streams, so margins may drift apart"
    return out


def bench_config(name: str, tmp: Path, args, variants: list[str]) -> dict:
    chunk = -(-args.steps // args.rounds)
    n_total = args.warmup + chunk * args.rounds + 1
    log(f"[config {name}] preparing weights, bins and TRL rows ...")
    spec_path, result = prepare_assets(name, tmp, args, n_total)
    workers: dict[str, Worker] = {}
    try:
        for v in variants:  # set up one at a time: setup and precompute times never overlap
            log(f"[config {name}] setting up {v} ...")
            workers[v] = Worker(v, spec_path, tmp / name / f"{v}.log", args.threads, args.malloc_mmap_threshold)
            workers[v].wait_ready()
        log(f"[config {name}] warm-up: {args.warmup} step(s) each; then {args.rounds} round(s) of {chunk} step(s)")
        order = list(workers.values())

        def progress(r: int) -> None:
            log(f"[config {name}] round {r + 1}/{args.rounds}: " + ", ".join(
                f"{w.name} {w.rounds[-1] / chunk:.3f}s" for w in order))

        take_turns(order, args.warmup, args.rounds, chunk, progress)
    finally:
        for w in workers.values():
            w.kill()

    result["variants"] = {v: summarise(w) for v, w in workers.items()}
    comps: dict[str, Any] = {}
    for kind in REFERENCES:
        if f"ours_{kind}" in workers and f"trl_{kind}" in workers:
            comps[kind] = compare(workers[f"ours_{kind}"], workers[f"trl_{kind}"], same_init=kind != "lora")
    res = result["variants"]
    for side in ("ours", "trl"):
        for kind in ("precompute", "lora"):
            if f"{side}_frozen" in res and f"{side}_{kind}" in res:
                f, p = res[f"{side}_frozen"], res[f"{side}_{kind}"]
                comps[f"{side}_peak_rss_{kind}_over_frozen"] = round(p["peak_rss_mb"] / f["peak_rss_mb"], 3)
                comps[f"{side}_peak_rss_above_imports_{kind}_over_frozen"] = round(
                    p["peak_rss_above_imports_mb"] / f["peak_rss_above_imports_mb"], 3)
    result["comparisons"] = comps
    goals = {}
    if "ours_peak_rss_precompute_over_frozen" in comps:
        goals["ours_precompute_peak_rss_le_0.6x_frozen"] = comps["ours_peak_rss_precompute_over_frozen"] <= 0.6
    for kind in REFERENCES:
        if kind in comps:
            goals[f"{kind}_speedup_ge_1.5x"] = comps[kind]["speedup_ours_vs_trl"] >= 1.5
    result["goals"] = goals
    return result


def table(report: dict) -> str:
    lines = []
    for name, res in report["configs"].items():
        lines.append(f"config {name} ({res['params'] / 1e6:.2f}M params, batch {report['batch_size']} pairs, "
                     f"~{res['real_tokens_per_step_mean']:.0f} real tokens/step, {report['threads']} threads)")
        lines.append(f"  {'variant':<16}{'steps/s':>9}{'med s/step':>11}{'setup s':>9}{'ref s':>8}"
                     f"{'peak MiB':>10}{'above imp':>10}")
        for v, r in res["variants"].items():
            lines.append(f"  {v:<16}{r['steps_per_s']:>9.3f}{r['step_s_median']:>11.3f}{r['setup_s']:>9.1f}"
                         f"{r['reference_setup_s']:>8.1f}{r['peak_rss_mb']:>10.0f}"
                         f"{r['peak_rss_above_imports_mb']:>10.0f}")
        for kind, c in res["comparisons"].items():
            if isinstance(c, dict):
                lines.append(f"  {kind:<11} ours/TRL speed {c['speedup_ours_vs_trl']:.2f}x (median of rounds; total "
                             f"time {c['speedup_total_time']:.2f}x), reward margins differ by "
                             f"{c['reward_margin_max_abs_diff']:.2g}")
            else:
                lines.append(f"  {kind}: {c}")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description="DPO steps/s and peak memory: our align stage vs trl.DPOTrainer")
    p.add_argument("--config", default="A", help="A, B or A,B (shapes of benchmarks/model_speed.py)")
    p.add_argument("--quick", action="store_true", help="a smoke run: 1 warm-up step, 2 measured steps, 16 pairs")
    p.add_argument("--steps", type=int, default=None, help="measured steps per variant (default 10; quick 2)")
    p.add_argument("--warmup", type=int, default=1, help="unmeasured steps per variant first")
    p.add_argument("--rounds", type=int, default=None,
                   help="the measured steps come in this many turns per variant (default: --steps, one step a turn)")
    p.add_argument("--batch_size", type=int, default=4, help="pairs per optimizer step")
    p.add_argument("--pairs", type=int, default=None, help="distinct training pairs (default 32; quick 16)")
    p.add_argument("--variants", default="frozen,precompute,lora",
                   help="comma-separated subset of frozen,precompute,lora (each: ours and TRL)")
    p.add_argument("--sides", default="ours,trl", help="comma-separated subset of ours,trl")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--threads", type=int, default=2, help="torch threads of every worker")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--malloc_mmap_threshold", type=int, default=None, metavar="BYTES",
                   help="set glibc's MALLOC_MMAP_THRESHOLD_ in the workers (e.g. 131072): freed tensors then leave "
                        "the resident set, so peak RSS follows the live tensors instead of the allocator's cache "
                        "(steps get slower: use it for memory figures, not speed)")
    p.add_argument("--out", default=None, help="also write the JSON here")
    args = parse_args_or_serve(p, worker_main, "SPEC", "VARIANT")
    if args is None:  # this was a worker
        return

    args.steps = args.steps or (2 if args.quick else 10)
    args.rounds = min(args.rounds or args.steps, args.steps)
    args.pairs = args.pairs or (16 if args.quick else 32)
    configs = [c.strip().upper() for c in args.config.split(",") if c.strip()]
    kinds = [k.strip() for k in args.variants.split(",") if k.strip()]
    sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    if bad := [c for c in configs if c not in CONFIGS]:
        p.error(f"unknown config(s) {bad} (allowed: A, B)")
    if bad := [k for k in kinds if k not in REFERENCES]:
        p.error(f"unknown variant(s) {bad} (allowed: {', '.join(REFERENCES)})")
    if bad := [s for s in sides if s not in ("ours", "trl")]:
        p.error(f"unknown side(s) {bad} (allowed: ours, trl)")
    if args.pairs < args.batch_size:
        p.error("--pairs must be at least --batch_size")
    variants = [f"{s}_{k}" for k in kinds for s in sides]

    import torch
    import transformers

    from importlib.metadata import version

    trl_version = version("trl") if "trl" in sides else None
    report: dict[str, Any] = {
        "benchmark": "preference_speed", "device": "cpu", "dtype": "float32", "threads": args.threads,
        "torch": torch.__version__, "transformers": transformers.__version__, "trl": trl_version,
        "quick": args.quick, "batch_size": args.batch_size, "steps": args.steps, "warmup": args.warmup,
        "rounds": args.rounds, "lr": args.lr, "beta": args.beta, "loss_type": "sigmoid",
        "adamw": {"betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0}, "grad_clip": 1.0,
        "lora": {"r": LORA["r"], "alpha": LORA["alpha"], "targets": LORA["targets"]},
        "malloc_mmap_threshold": args.malloc_mmap_threshold,
        "command": " ".join([Path(sys.executable).name, *sys.argv]), "configs": {},
    }
    t0 = time.perf_counter()
    report["loadavg_start"] = [round(x, 2) for x in os.getloadavg()]  # other work on the machine adds noise
    with tempfile.TemporaryDirectory(prefix="preference_speed_") as tmp:
        for name in configs:
            report["configs"][name] = bench_config(name, Path(tmp), args, variants)
    report["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    report["wall_s"] = round(time.perf_counter() - t0, 1)
    emit_report(report, args.out)
    log(table(report))


if __name__ == "__main__":
    main()
