"""Evaluate a model: perplexity, MMLU, GSM8K and HumanEval, with lm-evaluation-harness's conventions.

    python eval/run_eval.py --checkpoint CKPT --tasks ppl,gsm8k,mmlu,humaneval \\
        [--limit N] [--shots K] [--batch_size B] [--data_dir DIR] [--out DIR] [--adapter DIR] [--chat] \\
        [--samples_per_task n] [--device auto] [--dtype auto]
    python eval/run_eval.py --base_url http://127.0.0.1:8000/v1 --model NAME --tasks gsm8k,humaneval
    python eval/run_eval.py --config_path configs/eval/default.yaml [--set eval.limit=50] [--print_config]

CKPT is one of our checkpoints or a Hugging Face directory (+ a LoRA adapter with --adapter);
--base_url is any OpenAI-compatible server (generation tasks only). Data comes from --data_dir
(default: $LLM_DATA_DIR, else ../shared/data), else from the Hugging Face hub when online.
Results go to --out (default runs/eval/<name>/): results.json (every metric with its standard
error, the model, data hashes, settings), results.md (a table) and samples_<task>.jsonl.
Flags override the config file; user mistakes exit 2 with one line.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any, Optional

if __package__ in (None, ""):  # run as a script: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from eval.config import EvalConfig  # noqa: E402
from utils.config import (apply_overrides, check_recipe_needs, find_config_file, read_yaml, to_plain,  # noqa: E402
                          to_yaml, validate)
from utils.errors import UserError, cli_main  # noqa: E402
from utils.paths import RUNS_DIR, shared_data_dir  # noqa: E402

# flag -> (section, key); paths resolve against the working directory, as typed
FLAGS = {
    "checkpoint": ("model", "checkpoint"), "adapter": ("model", "adapter"), "base_url": ("model", "base_url"),
    "model": ("model", "name"), "device": ("model", "device"), "dtype": ("model", "dtype"),
    "tasks": ("eval", "tasks"), "limit": ("eval", "limit"), "shots": ("eval", "shots"),
    "batch_size": ("eval", "batch_size"), "data_dir": ("eval", "data_dir"), "chat": ("eval", "chat"),
    "samples_per_task": ("eval", "samples_per_task"), "out": ("output", "out"),
}
PATH_FLAGS = ("checkpoint", "adapter", "data_dir", "out")
MINIMUM = {"limit": 1, "shots": 0, "batch_size": 1, "samples_per_task": 1}


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config_path", help="YAML config (configs/eval/default.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, typed like YAML (repeatable): --set eval.ppl_stride=128")
    p.add_argument("--print_config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--checkpoint", help="our checkpoint or a Hugging Face model directory")
    p.add_argument("--adapter", help="LoRA adapter directory to apply to --checkpoint")
    p.add_argument("--base_url", help="OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1")
    p.add_argument("--model", help="model name on --base_url (default: the first it lists)")
    p.add_argument("--tasks", help="comma-separated: ppl,gsm8k,mmlu,humaneval")
    p.add_argument("--limit", type=int, help="samples per task (MMLU: per subject)")
    p.add_argument("--shots", type=int, help="few-shot examples (default 5 for mmlu and gsm8k)")
    p.add_argument("--batch_size", type=int, help="rows per forward / sequences decoded together (default 16)")
    p.add_argument("--data_dir", help="data directory (default: $LLM_DATA_DIR, else ../shared/data)")
    p.add_argument("--out", help="output directory (default: runs/eval/<name>)")
    p.add_argument("--chat", action="store_true", default=None, help="gsm8k / mmlu in the chat template")
    p.add_argument("--samples_per_task", type=int, help="HumanEval completions per problem (pass@1, pass@10)")
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N | mps")
    p.add_argument("--dtype", help="auto | float32 | bfloat16 | float16")
    return p.parse_args(argv)


def build_config(args: argparse.Namespace) -> EvalConfig:
    data: dict[str, Any] = read_yaml(find_config_file(args.config_path)) if args.config_path else {}
    data = apply_overrides(data, args.overrides)
    for flag, (section, key) in FLAGS.items():
        value = getattr(args, flag)
        if value is None:
            continue
        if flag in MINIMUM and value < MINIMUM[flag]:
            raise UserError(f"--{flag} must be >= {MINIMUM[flag]}, got {value}")
        if flag in PATH_FLAGS:
            value = str(Path(value).expanduser().resolve())
        node = data.setdefault(section, {})
        if not isinstance(node, dict):
            raise UserError(f"config section `{section}` must be a mapping")
        node[key] = value
    if args.checkpoint is not None or args.base_url is not None:  # a flag's source replaces the file's
        other = "base_url" if args.checkpoint is not None else "checkpoint"
        data["model"].pop(other, None)
    cfg = validate(data, EvalConfig)
    if args.checkpoint is None and args.base_url is None:  # a recipe's model, not one named on the command line
        check_recipe_needs(cfg.recipe)
    return cfg


def default_name(cfg: EvalConfig) -> str:
    if cfg.model.checkpoint is not None:
        path = cfg.model.checkpoint
        name = f"{path.parent.parent.name}-{path.name}" if path.parent.name == "checkpoints" else path.name
        if cfg.model.adapter is not None:
            name += f"+{cfg.model.adapter.name}"
    else:
        name = cfg.model.name or "server"
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", name)


def make_model(cfg: EvalConfig) -> Any:
    m = cfg.model
    if m.base_url is not None:
        from eval.api_model import OpenAIClientLM

        return OpenAIClientLM(m.base_url, m.name, concurrency=m.concurrency)
    from eval.models import LocalLM

    return LocalLM(m.checkpoint, m.adapter, device=m.device, dtype=m.dtype, batch_size=cfg.eval.batch_size,
                   kv_cache_memory_mb=m.kv_cache_memory_mb)


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    cfg = build_config(args)
    if args.print_config:
        print(to_yaml(cfg), end="")
        return
    e = cfg.eval
    if e.data_dir is not None and not e.data_dir.is_dir():
        raise UserError(f"data directory not found: {e.data_dir}")
    if cfg.model.checkpoint is not None and not cfg.model.checkpoint.exists():
        raise UserError(f"checkpoint not found: {cfg.model.checkpoint}")
    data_dir = e.data_dir if e.data_dir is not None else shared_data_dir()

    from eval.results import markdown_table, write_results
    from eval.runner import check_supported, run_task
    from eval.tasks import TaskSettings, make_task

    settings = TaskSettings(data_dir=data_dir, limit=e.limit, shots=e.shots, chat=e.chat,
                            samples_per_task=e.samples_per_task, temperature=e.temperature, top_p=e.top_p,
                            max_gen_toks=e.max_gen_toks, seed=e.seed, ppl_data=e.ppl_data, ppl_stride=e.ppl_stride,
                            timeout=e.timeout, workers=e.workers, builtin_fallback=e.data_dir is None)
    tasks = [make_task(name, settings) for name in e.tasks]
    model = make_model(cfg)
    check_supported(tasks, model)
    for task in tasks:  # every data problem shows up before the first task runs
        task.load(model)
    out = cfg.output.out or RUNS_DIR / "eval" / (cfg.output.name or default_name(cfg))
    plain = to_plain(cfg)
    plain["eval"]["data_dir"] = str(data_dir) if data_dir is not None else None
    results = []
    for task in tasks:
        results.append(run_task(task, model))
        data = write_results(out, model.describe(), plain, results)  # after each task: nothing is lost
    print(markdown_table(data), end="")
    print(f"results: {out / 'results.json'}", file=sys.stderr)


if __name__ == "__main__":
    cli_main(main)
