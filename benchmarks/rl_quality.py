"""What online RL does to a model: held-out reward before and after GRPO, GSPO, PPO and RFT on the
built-in verifiable problems, from one SFT checkpoint warmed up on worked solutions, as JSON.

    make demo                                              # data/ + the nano DeepSeek-V3's SFT model
    python benchmarks/rl_quality.py [--sft runs/classic/deepseek/v3_nano/1_sft_qlora/checkpoints/final]
        [--data_dir data] [--warm_config configs/classic_reproductions/deepseek/v3_nano/1_sft_full.yaml]
        [--algorithms grpo,gspo,ppo,rft] [--steps 400] [--warmup_steps 300] [--warm CKPT] [--out rl.json]
        [--val_prompts 200] [--val_samples 4] [--eval_interval 50]
        [--workdir DIR]   # keep the warm-up and the runs (default: a temporary directory)
        [--set training.learning_rate=1e-4 ...]

1. Warm-up (skipped with ``--warm CKPT``): the SFT model is fine-tuned for ``--warmup_steps`` on the
   worked solutions of 4,000 built-in problems ("... 7 + 5 = 12. The answer is 12.") generated
   with another seed than the RL prompts, and none whose question is in the RL prompts file
   (`data_pipeline.builtin.verifiable`; bins built by `build_sft_bins.py --input`, the run by the
   real SFT stage with ``--warm_config``: the SFT model's own full-SFT recipe config by default).
   A tiny model learns the answer format there; RL
   then has rewards to work with.
2. For each algorithm the real stage runs (`align.rl_stage`, the shipped configs/align/<alg>.yaml
   with paths, steps and held-out size overridden) into a temporary runs directory. The held-out
   reward is the mean verifiable reward of ``--val_samples`` samples (temperature 1) per held-out
   prompt — the file's last ``--val_prompts`` prompts, never trained on — at step 0 and every
   ``--eval_interval`` steps. Reported: before, after, best, the curve ([step, reward, wall
   seconds since the start, training seconds = wall minus the evaluations so far]), wall and
   evaluation seconds, and the rollouts' last logged statistics.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.procs import emit_report  # noqa: E402
from align import rl_stage  # noqa: E402
from align.rl_config import RLConfig  # noqa: E402
from utils.config import load_config  # noqa: E402
from utils.paths import REPO_ROOT, resolve_path  # noqa: E402


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def warm_up(sft: Path, data_dir: Path, root: Path, steps: int, config: Path) -> Path:
    """SFT on built-in worked solutions (none of the RL prompts); returns the final checkpoint."""
    import subprocess

    from data_pipeline.builtin.verifiable import generate_problems

    rl_questions = {json.loads(line)["prompt"] for line in (data_dir / "prompts" / "rl_prompts.jsonl").open()}
    warm_data = root / "warmup_data"
    warm_data.mkdir(parents=True)
    os.symlink(data_dir.resolve() / "tokenizer", warm_data / "tokenizer")
    problems = [p for p in generate_problems(4000, seed=12345) if p.prompt not in rl_questions]
    src = warm_data / "worked_solutions.jsonl"
    src.write_text("".join(json.dumps({"instruction": p.prompt, "input": "", "output": p.solution}) + "\n"
                           for p in problems))
    py = sys.executable
    subprocess.run([py, "data_pipeline/processing/build_sft_bins.py", "--data_dir", str(warm_data),
                    "--input", str(src)], cwd=REPO_ROOT, check=True)
    run_dir = root / "runs" / "sft" / "warmup"
    subprocess.run([py, "finetune/sft_train.py", "--config_path", str(config),
                    "--set", f"data.data_dir={warm_data}", "--set", f"checkpointing.init_from={sft}",
                    "--set", f"logging.run_dir={run_dir}", "--set", "logging.run_name=warmup",
                    "--set", f"training.max_steps={steps}", "--set", f"training.eval_interval={steps}",
                    "--set", "logging.sample_interval=0", "--set", "training.warmup_steps=10",
                    "--set", f"checkpointing.save_interval={steps}", "--set", "training.device=cpu"],
                   cwd=REPO_ROOT, check=True)
    return run_dir / "checkpoints" / "final"


def run_algorithm(algorithm: str, start: Path, data_dir: Path, runs: Path, args: argparse.Namespace) -> dict[str, Any]:
    overrides = [f"data.data_dir={data_dir}", f"checkpointing.init_from={start}", f"logging.runs_dir={runs}",
                 f"logging.run_name={algorithm}", f"training.max_steps={args.steps}",
                 f"training.eval_interval={args.eval_interval}", f"checkpointing.save_interval={args.steps}",
                 f"rl.val_prompts={args.val_prompts}", f"rl.val_samples={args.val_samples}", "training.device=cpu",
                 "logging.log_interval=10",
                 *args.overrides]
    cfg = load_config(REPO_ROOT / "configs" / "align" / f"{algorithm}.yaml", RLConfig, overrides)
    t0 = time.time()
    rl_stage.train(cfg)
    seconds = time.time() - t0
    records = metrics(runs / "rl" / algorithm)
    curve, val_s = [], 0.0
    for r in records:
        if "val_reward" in r:  # [step, reward, wall s since the start, of which training (evaluations left out)]
            val_s += r.get("time/val_s", 0.0)
            curve.append([r["step"], round(r["val_reward"], 4), round(r["time"] - t0, 1), round(r["time"] - t0 - val_s, 1)])
    train = [r for r in records if "reward" in r]
    last = {k: round(v, 4) for k, v in train[-1].items()
            if k in ("reward", "reward_std", "kl", "entropy", "completion_length", "clip_ratio/region",
                     "rft/kept_frac", "vf_loss")} if train else {}
    return {"before": curve[0][1], "after": curve[-1][1], "best": max(c[1] for c in curve),
            "gain": round(curve[-1][1] - curve[0][1], 4), "curve": curve, "steps": args.steps,
            "seconds": round(seconds, 1), "eval_seconds": round(val_s, 1), "last_rollout": last}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sft", default="runs/classic/deepseek/v3_nano/1_sft_qlora/checkpoints/final")
    ap.add_argument("--data_dir", default="data")
    ap.add_argument("--warm_config", default="configs/classic_reproductions/deepseek/v3_nano/1_sft_full.yaml",
                    help="the SFT config of the warm-up (paths, steps and schedule overridden)")
    ap.add_argument("--algorithms", default="grpo,gspo,ppo,rft")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--eval_interval", type=int, default=50)
    ap.add_argument("--val_prompts", type=int, default=200)
    ap.add_argument("--val_samples", type=int, default=4, help="samples per held-out prompt")
    ap.add_argument("--warmup_steps", type=int, default=300)
    ap.add_argument("--warm", default=None, help="an already warmed-up checkpoint (skips the warm-up)")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    ap.add_argument("--workdir", default=None,
                    help="keep the warm-up and the runs here (reuse the warm-up later with --warm "
                         "WORKDIR/runs/sft/warmup/checkpoints/final) instead of a temporary directory")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="extra config overrides for every algorithm (e.g. training.learning_rate=1e-4)")
    args = ap.parse_args()
    sft, data_dir = resolve_path(args.sft), resolve_path(args.data_dir)
    for what, path in (("SFT checkpoint", sft), ("data dir", data_dir)):
        if not path.exists():
            raise SystemExit(f"{what} {path} not found: run `python utils/demo.py` (make demo) first")
    result: dict[str, Any] = {"sft": str(sft), "data_dir": str(data_dir)}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if args.workdir:
            root = resolve_path(args.workdir)
            if root.exists() and any(root.iterdir()):
                raise SystemExit(f"--workdir {root} is not empty: give a new directory")
            root.mkdir(parents=True, exist_ok=True)
        if args.warm:
            start = resolve_path(args.warm)
        else:
            t0 = time.time()
            start = warm_up(sft, data_dir, root, args.warmup_steps, resolve_path(args.warm_config))
            result["warmup"] = {"steps": args.warmup_steps, "seconds": round(time.time() - t0, 1)}
        result["start"] = str(start)
        for algorithm in args.algorithms.split(","):
            result[algorithm] = run_algorithm(algorithm, start, data_dir, root / "runs", args)
            print(json.dumps({algorithm: result[algorithm]}), flush=True)
    emit_report(result, args.out)


if __name__ == "__main__":
    main()
