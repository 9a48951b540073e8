"""What offline alignment does to a model: held-out preference accuracy and margins before and
after each method, from one SFT checkpoint, printed as JSON.

    make demo                                              # data/ + the nano DeepSeek-V3's QLoRA SFT model
    python benchmarks/alignment_quality.py [--sft runs/classic/deepseek/v3_nano/1_sft_qlora/checkpoints/final]
        [--data_dir data]
        [--methods reward,dpo,orpo,simpo,kto] [--steps 150] [--real] [--out quality.json]

For every method it runs the real stage (`align.stage`, the shipped configs/align/*.yaml with the
paths and step count overridden) into a temporary runs directory, validates once *before* the
first update (step 0) and once after the last, over the whole held-out split, and reports:
``val_rewards/accuracies`` (implicit-reward accuracy: β·log-ratio of chosen > rejected),
``val_rewards/margins``, and the policy's own log-prob margin ``logps/chosen - logps/rejected``.
The reward model reports ``val_accuracy`` and ``val_margin``. At step 0 a policy equals its
reference, so its implicit rewards are all 0 and the accuracy (a strict >) is 0. ORPO's and SimPO's
rewards are the policy's own (length-averaged) log-probs, already above chance at the start, so
every policy method also reports, after training, ``vs_sft/accuracy`` and ``vs_sft/margin``: the
implicit reward measured against the starting model (`versus_start`), one yardstick for all.

``--real`` also trains the reward model on the real preference pairs in the shared data
directory (HH-RLHF harmless-base test, the LLaMA-Factory DPO demo set), each encoded with the
SFT model's tokenizer into its own bins, and reports held-out accuracy (the models are tiny:
no threshold).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.procs import emit_report  # noqa: E402
from align import stage  # noqa: E402
from align.config import AlignConfig  # noqa: E402
from align.data import preference_bins  # noqa: E402
from align.reference import compute_table  # noqa: E402
from data_pipeline.chat_loaders import PreferenceLoader  # noqa: E402
from data_pipeline.processing import build_preference_bins  # noqa: E402
from trainer.launch import launch  # noqa: E402
from utils.config import load_config  # noqa: E402
from utils.paths import REPO_ROOT, resolve_path, shared_data_dir  # noqa: E402

CONFIGS = {"reward": "reward_model.yaml", "dpo": "dpo.yaml", "orpo": "orpo.yaml", "simpo": "simpo.yaml",
           "kto": "kto.yaml"}
KEYS = ("val_loss", "val_rewards/accuracies", "val_rewards/margins", "val_logps/chosen", "val_logps/rejected",
        "val_accuracy", "val_margin")


def run_method(method: str, sft: Path, data_dir: Path, runs: Path, steps: int, batch_size: int) -> dict[str, Any]:
    """Train one method with the shipped config; validation at step 0 and at the end."""
    overrides = [f"data.data_dir={data_dir}", f"checkpointing.init_from={sft}", f"logging.runs_dir={runs}",
                 f"logging.run_name={method}-{data_dir.name}", f"training.max_steps={steps}",
                 f"training.batch_size={batch_size}", f"training.eval_interval={steps}",
                 f"checkpointing.save_interval={steps}", "training.device=cpu"]
    cfg = load_config(REPO_ROOT / "configs" / "align" / CONFIGS[method], AlignConfig, overrides)
    reward = method == "reward"
    source, weights = stage.prepare(cfg, reward)
    t0 = time.time()
    with launch(cfg) as dist:
        trainer = stage.build_trainer(cfg, weights, source, dist, reward)
        cfg.training.eval_steps = 10**6  # the whole held-out split (the factory stops at one epoch)
        before = trainer.validate()
        table0 = None if reward else held_out_logps(trainer.model, cfg)
        trainer.fit()
        after = trainer.last_val
        if not reward:
            after.update(versus_start(table0, held_out_logps(trainer.model, cfg)))
    pick = lambda r: {k: round(v, 4) for k, v in r.items() if k in KEYS or k.startswith("vs_sft/")}  # noqa: E731
    result = {"before": pick(before), "after": pick(after), "val_examples": before["val_tokens"],
              "steps": steps, "seconds": round(time.time() - t0, 1)}
    if not reward:
        for when in ("before", "after"):
            r = result[when]
            r["policy_logp_margin"] = round(r["val_logps/chosen"] - r["val_logps/rejected"], 4)
    return result


def held_out_logps(model: torch.nn.Module, cfg: AlignConfig) -> torch.Tensor:
    """(N, 2) summed response log-probs (chosen, rejected) of every held-out pair under `model`."""
    val = PreferenceLoader(preference_bins(cfg)[1], batch_size=cfg.training.batch_size, shuffle=False,
                           seq_len=cfg.data.seq_len, vocab_size=cfg.model.vocab_size)
    device = next(model.parameters()).device
    return compute_table(model, val, False, cfg.training.batch_size, 0, 1, device, contextlib.nullcontext, False)


def versus_start(start: torch.Tensor, end: torch.Tensor) -> dict[str, float]:
    """One yardstick for every method, reference-free ones included: the implicit reward with the
    *starting* (SFT) model as reference, log π(y|x) − log π_SFT(y|x). ``vs_sft/accuracy``: the
    share of held-out pairs whose chosen reply gained more log-probability than the rejected one;
    ``vs_sft/margin``: the mean of that difference (nats)."""
    gain = end - start  # (N, 2)
    diff = gain[:, 0] - gain[:, 1]
    return {"vs_sft/accuracy": round(float((diff > 0).float().mean()), 4), "vs_sft/margin": round(float(diff.mean()), 4)}


def real_bins(sft: Path, root: Path) -> dict[str, Path]:
    """The shared real preference files encoded with the SFT model's tokenizer, one data dir each."""
    shared = shared_data_dir()
    if shared is None:
        raise SystemExit("--real needs the shared data (set LLM_DATA_DIR or place it at ../shared/data)")
    out = {}
    for name, file in (("hh_rlhf", "hh_rlhf_harmless_base_test.jsonl.gz"), ("dpo_en_demo", "dpo_en_demo.json")):
        data = root / name
        (data / "tokenizer").mkdir(parents=True)
        for f in sft.glob("tokenizer*"):
            (data / "tokenizer" / f.name).write_bytes(f.read_bytes())
        for f in ("special_tokens_map.json", "chat_template.jinja"):
            if (sft / f).is_file():
                (data / "tokenizer" / f).write_bytes((sft / f).read_bytes())
        build_preference_bins.main(["--data_dir", str(data), "--input", str(shared / "preference" / file),
                                    "--max_seq_len", "512", "--val_fraction", "0.1"])
        out[name] = data
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sft", default="runs/classic/deepseek/v3_nano/1_sft_qlora/checkpoints/final", help="the SFT checkpoint to start from")
    ap.add_argument("--data_dir", default="data", help="data dir with preference/ bins and tokenizer/")
    ap.add_argument("--methods", default="reward,dpo,orpo,simpo,kto")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch_size", type=int, default=8)
    ap.add_argument("--real", action="store_true", help="also a reward model on the shared real pairs")
    ap.add_argument("--real_steps", type=int, default=300)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(2)
    sft, data_dir = resolve_path(args.sft), resolve_path(args.data_dir)
    results: dict[str, Any] = {"sft": str(sft), "data_dir": str(data_dir), "builtin": {}}
    with tempfile.TemporaryDirectory() as tmp:
        runs = Path(tmp) / "runs"
        for method in args.methods.split(","):
            results["builtin"][method] = run_method(method, sft, data_dir, runs, args.steps, args.batch_size)
            print(f"[quality] {method}: {json.dumps(results['builtin'][method])}", file=sys.stderr, flush=True)
        if args.real:
            results["real_reward_model"] = {}
            for name, data in real_bins(sft, Path(tmp) / "real").items():
                results["real_reward_model"][name] = run_method("reward", sft, data, runs, args.real_steps,
                                                                args.batch_size)
                print(f"[quality] reward model on {name}: {json.dumps(results['real_reward_model'][name])}",
                      file=sys.stderr, flush=True)
    emit_report(results, args.out)


if __name__ == "__main__":
    main()
