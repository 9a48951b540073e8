"""What each nano recipe reaches: the quick start's chain (0_pretrain → 1_sft_qlora → 3_rlhf_grpo →
4_eval) run for every nano recipe as written, one after the other, with wall times.

    python benchmarks/recipes_nano.py [--recipes deepseek/v3_nano,llama/llama3_nano] [--compile]
        [--data_dir DIR] [--out results.json]

The data pipeline runs once (built-in sources, offline) into a temporary directory unless
``--data_dir`` names a built one; each recipe's configs are generated there with
``utils/setup_classic_models.py`` and every stage runs as a subprocess, exactly as its command
line reads (``--compile`` on 0_pretrain as in the quick start). Prints one JSON report (also to
``--out``) and a markdown table for the README: pretraining and SFT validation loss, the GRPO
held-out reward before → after, the evaluation numbers, and each stage's wall time.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from utils.paths import REPO_ROOT  # noqa: E402
from utils.recipes import DATA_COMMANDS, FAMILIES, STAGES  # noqa: E402

CHAIN = ["0_pretrain", "1_sft_qlora", "3_rlhf_grpo", "4_eval"]
NANO = [f"{fam}/{a.prefix}_nano" for fam, archs in FAMILIES.items() for a in archs]


def run(cmd: list[str], log: Path) -> float:
    t0 = time.perf_counter()
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        proc = subprocess.run([sys.executable, *cmd], cwd=REPO_ROOT, stdout=f, stderr=subprocess.STDOUT,
                              stdin=subprocess.DEVNULL)
    if proc.returncode != 0:  # the log lives in a temporary directory: show its tail before it goes
        tail = "".join(log.read_text().splitlines(keepends=True)[-40:])
        raise SystemExit(f"{tail}\nfailed ({proc.returncode}): {' '.join(cmd)}")
    return time.perf_counter() - t0


def metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []


def last(rows: list[dict[str, Any]], key: str) -> Optional[float]:
    values = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
    return values[-1] if values else None


def first(rows: list[dict[str, Any]], key: str) -> Optional[float]:
    values = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
    return values[0] if values else None


def eval_numbers(results: dict[str, Any]) -> dict[str, Optional[float]]:
    r = results["results"]

    def value(task: str, metric: str) -> Optional[float]:
        return (r.get(task, {}).get("metrics", {}).get(metric) or {}).get("value")

    return {"token_perplexity": value("ppl", "token_perplexity"),
            "gsm8k_flexible": value("gsm8k", "exact_match,flexible-extract"),
            "gsm8k_strict": value("gsm8k", "exact_match,strict-match"), "mmlu_acc": value("mmlu", "acc"),
            "gsm8k_n": r.get("gsm8k", {}).get("n_samples"), "mmlu_n": r.get("mmlu", {}).get("n_samples")}


def run_recipe(recipe: str, data_dir: Path, root: Path, compile_: bool, log: Path) -> dict[str, Any]:
    family = recipe.split("/")[0]
    configs, runs = root / "configs", root / "runs"
    run(["utils/setup_classic_models.py", "--families", family, "--sizes", "nano", "--out_dir", str(configs),
         "--runs_dir", str(runs), "--data_dir", str(data_dir)], log)
    scripts = {s.name: s.script for s in STAGES}
    seconds: dict[str, float] = {}
    for stage in CHAIN:
        cmd = [scripts[stage], "--config_path", str(configs / recipe / f"{stage}.yaml")]
        if stage == "0_pretrain" and compile_:
            cmd.append("--compile")
        seconds[stage] = round(run(cmd, log), 1)
    pre, sft, rl = (metrics(runs / recipe / s) for s in CHAIN[:3])
    results = json.loads((runs / recipe / "4_eval" / "results.json").read_text())
    return {"recipe": recipe, "seconds": seconds, "seconds_total": round(sum(seconds.values()), 1),
            "pretrain_val_loss": last(pre, "val_loss"), "sft_val_loss": last(sft, "val_loss"),
            "grpo_val_reward_first": first(rl, "val_reward"), "grpo_val_reward_last": last(rl, "val_reward"),
            "eval": eval_numbers(results)}


def fmt(x: Optional[float], digits: int = 3) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def table(rows: list[dict[str, Any]]) -> str:
    out = ["| recipe | pretrain val loss | SFT val loss | GRPO held-out reward | token ppl | GSM8K (flex) | "
           "MMLU acc | wall (pretrain / SFT / GRPO / eval) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        s, e = r["seconds"], r["eval"]
        out.append(f"| `{r['recipe']}` | {fmt(r['pretrain_val_loss'])} | {fmt(r['sft_val_loss'])} | "
                   f"{fmt(r['grpo_val_reward_first'])} → {fmt(r['grpo_val_reward_last'])} | "
                   f"{fmt(e['token_perplexity'], 1)} | {fmt(e['gsm8k_flexible'], 2)} | {fmt(e['mmlu_acc'], 3)} | "
                   f"{r['seconds_total']:.0f} s ({s['0_pretrain']:.0f} / {s['1_sft_qlora']:.0f} / "
                   f"{s['3_rlhf_grpo']:.0f} / {s['4_eval']:.0f}) |")
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipes", default=",".join(NANO), help=f"comma-separated (default all: {','.join(NANO)})")
    p.add_argument("--compile", action="store_true", help="0_pretrain with --compile, as the quick start")
    p.add_argument("--data_dir", help="a data directory the data pipeline has built (default: build one)")
    p.add_argument("--out", help="also write the JSON report here")
    args = p.parse_args()
    recipes = [r.strip() for r in args.recipes.split(",") if r.strip()]
    unknown = [r for r in recipes if r not in NANO]
    if unknown:
        raise SystemExit(f"unknown recipe(s) {unknown}; choose from {NANO}")
    with tempfile.TemporaryDirectory(prefix="recipes_nano_") as tmp:
        root = Path(tmp)
        log = root / "log.txt"
        data_dir = Path(args.data_dir).resolve() if args.data_dir else root / "data"
        data_s = None
        if not args.data_dir:
            data_s = round(sum(run([*cmd, "--data_dir", str(data_dir)], log) for cmd in DATA_COMMANDS), 1)
        rows = []
        for recipe in recipes:
            rows.append(run_recipe(recipe, data_dir, root / recipe.replace("/", "_"), args.compile, log))
            print(f"{recipe}: {rows[-1]['seconds_total']:.0f} s {json.dumps(rows[-1])}", file=sys.stderr, flush=True)
        report = {"benchmark": "recipes_nano", "cpu_count": os.cpu_count(), "compile": args.compile,
                  "data_pipeline_s": data_s, "recipes": rows, "markdown": table(rows)}
    text = json.dumps(report, indent=1)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)
    print(report["markdown"], file=sys.stderr)


if __name__ == "__main__":
    main()
