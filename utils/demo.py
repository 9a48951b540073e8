"""`make demo`: the whole pipeline end to end on built-in data, small enough for 2 CPU cores.

Runs the same commands a user types (README), into `data/demo/`, `runs/pretrain/demo/` and
`runs/sft/demo/`, so it never touches a real `data/` directory: data pipeline → pretraining
→ full SFT on the built-in instructions → generation from both checkpoints. Each step's own one-line summary is shown;
at the end a short report says what was made and where.

    python utils/demo.py [--quick]     # --quick: fewer training steps (smoke test)
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from utils.paths import REPO_ROOT

DATA = "data/demo"
RUN_NAME = "demo"


def steps(quick: bool) -> list[tuple[str, list[str]]]:
    d = ["--data_dir", DATA]
    pretrain_steps = "150" if quick else "600"
    sft_steps = "60" if quick else "200"
    pretrained = f"runs/pretrain/{RUN_NAME}/checkpoints/final"
    sft_final = f"runs/sft/{RUN_NAME}/checkpoints/final"
    return [
        ("download stories (built-in corpus, offline)",
         ["data_pipeline/download/download_tinystories.py", "--source", "builtin", *d]),
        ("train tokenizer", ["data_pipeline/tokenizer/train_tokenizer.py", "--vocab_size", "4096", "--data_limit_mb", "100", *d]),
        ("encode stories", ["data_pipeline/processing/encode_stories.py", *d]),
        ("build pretrain bins", ["data_pipeline/processing/build_pretrain_bins.py", *d]),
        ("build SFT bins", ["data_pipeline/processing/build_sft_bins.py", *d]),
        ("build preference bins", ["data_pipeline/processing/build_preference_bins.py", *d]),
        ("RL prompts (built-in tasks)", ["data_pipeline/download/download_prompts.py", "--source", "builtin", *d]),
        ("pretrain a tiny model", [
            "pretrain/train.py", "--config_path", "configs/pretrain/tiny.yaml",
            "--set", f"data.data_dir={DATA}", "--set", f"logging.run_name={RUN_NAME}",
            "--set", f"training.max_steps={pretrain_steps}",
        ]),
        ("continue a story with the pretrained model (generation engine)", [
            "inference/generate.py", "--checkpoint", pretrained, "--prompt", "Once upon a time",
            "--max_new_tokens", "60", "--temperature", "0",
        ]),
        ("supervised fine-tuning on the built-in instructions (chat template)", [
            "finetune/sft_train.py", "--config_path", "configs/sft/full.yaml",
            "--set", f"data.data_dir={DATA}", "--set", f"logging.run_name={RUN_NAME}",
            "--set", f"checkpointing.init_from={pretrained}", "--set", f"training.max_steps={sft_steps}",
        ]),
        ("chat with the fine-tuned model", [
            "inference/generate.py", "--checkpoint", sft_final, "--chat", "--temperature", "0",
            "--max_new_tokens", "80", "--prompt", "Write a short story about a brave little cat.",
        ]),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer pretraining steps (smoke test)")
    args = ap.parse_args()

    run_dir = REPO_ROOT / "runs" / "pretrain" / RUN_NAME
    sft_dir = REPO_ROOT / "runs" / "sft" / RUN_NAME
    for d in (REPO_ROOT / DATA, run_dir, sft_dir):
        shutil.rmtree(d, ignore_errors=True)
    t_all = time.time()
    for i, (title, cmd) in enumerate(steps(args.quick), 1):
        print(f"\n[demo {i}] {title}: python {' '.join(cmd)}", flush=True)
        t0 = time.time()
        proc = subprocess.run([sys.executable, *cmd], cwd=REPO_ROOT)
        if proc.returncode != 0:
            print(f"[demo] step {i} ({title}) failed with exit code {proc.returncode}", file=sys.stderr)
            raise SystemExit(proc.returncode)
        print(f"[demo {i}] done in {time.time() - t0:.1f}s", flush=True)

    print(f"\n[demo] finished in {time.time() - t_all:.0f}s. What it made:")
    print(f"  data:        {DATA}/ (raw stories, tokenizer, pretrain/SFT/preference bins, RL prompts)")
    for name, d in (("pretrain", run_dir), ("sft", sft_dir)):
        print(f"  {name + ' run:':14s}{d.relative_to(REPO_ROOT)}/ (config.yaml, metrics.jsonl, train.log, loss.png, checkpoints/)")
        summarize(d / "metrics.jsonl")


def summarize(metrics: Path) -> None:
    if not metrics.exists():
        return
    rows = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
    losses = [r["loss"] for r in rows if "loss" in r]
    vals = [r["val_loss"] for r in rows if "val_loss" in r]
    if losses:
        print(f"    train loss {losses[0]:.3f} → {losses[-1]:.3f}" + (f", val loss {vals[-1]:.3f}" if vals else ""))


if __name__ == "__main__":
    main()
