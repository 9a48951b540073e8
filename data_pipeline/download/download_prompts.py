"""Last step of the data pipeline: prompts with checkable answers for RL, `<data_dir>/prompts/rl_prompts.jsonl`.

Each line is {"prompt", "answer", "task", "source"}: the question, what a verifier compares
against, the task name and where it came from. GSM8K (Cobbe et al. 2021) grade-school math
comes from the hub (`openai/gsm8k`, config main) or a local copy in the same JSON Lines
format ({"question", "answer"}; the reference is the number after `####`, commas removed);
built-in problems (small arithmetic, counting, reading questions about a generated story)
are added so RL also works offline. Offline, the hub source falls back to the built-in
problems only, with a WARNING (or exits 2 under --no_fallback).

    python data_pipeline/download/download_prompts.py [--source hub|local|builtin] [--max_prompts N]
"""
from __future__ import annotations

import argparse
import json
import random
import re
import time
from collections import Counter
from pathlib import Path
from typing import Any, Optional

from data_pipeline.builtin import generate_verifiable_prompts
from data_pipeline.download.sources import (
    add_source_args,
    check_source_args,
    created_now,
    fallback,
    field,
    probe_hub,
    read_jsonl,
    stream_hub,
)
from data_pipeline.formats import write_json_atomic
from utils.errors import UserError, cli_main
from utils.paths import resolve_path

DATASET, CONFIG = "openai/gsm8k", "main"
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_source_args(p, "GSM8K")
    p.add_argument("--max_prompts", type=int, default=None,
                   help="GSM8K prompts to keep from the hub or --input (default: all)")
    p.add_argument("--builtin_prompts", type=int, default=2000,
                   help="built-in verifiable prompts to add (0: none)")
    p.add_argument("--split", choices=("train", "test"), default="train", help="GSM8K split on the hub")
    return p.parse_args(argv)


def gsm8k_answer(solution: str, where: str) -> str:
    """The reference number of a GSM8K solution: the text after '####', commas removed."""
    if "####" not in solution:
        raise UserError(f"{where}: the answer has no '#### <number>' line (is this GSM8K data?)")
    answer = solution.rsplit("####", 1)[1].strip().replace(",", "")
    if not _NUMBER.fullmatch(answer):
        raise UserError(f"{where}: the final answer {answer!r} is not a number")
    return answer


def gsm8k_record(rec: dict[str, Any], where: str, source: str) -> dict[str, str]:
    """A GSM8K row {"question", "answer"} (or an RL prompt {"prompt", "answer"}) as an RL prompt."""
    hint = "; expected GSM8K lines {\"question\", \"answer\"} or {\"prompt\", \"answer\"}"
    if "question" in rec:
        prompt = field(rec, "question", where, hint)
        answer = gsm8k_answer(field(rec, "answer", where, hint), where)
    else:
        prompt = field(rec, "prompt", where, hint)
        answer = field(rec, "answer", where, hint).strip()
    if not prompt.strip() or not answer:
        raise UserError(f"{where}: empty prompt or answer")
    return {"prompt": prompt.strip(), "answer": answer, "task": rec.get("task", "gsm8k"), "source": source}


def hub_prompts(split: str, limit: Optional[int], timeout: float) -> list[dict[str, str]]:
    source = f"{DATASET}:{CONFIG}/{split}"
    rows = stream_hub(DATASET, CONFIG, split, limit, timeout, desc=source)
    return [gsm8k_record(r, f"{source} row {i}", source) for i, r in enumerate(rows)]


def local_prompts(path: Path, limit: Optional[int]) -> list[dict[str, str]]:
    records = read_jsonl(path)[:limit]
    return [gsm8k_record(r, f"record {i} of {path}", str(path)) for i, r in enumerate(records, 1)]


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.max_prompts is not None and args.max_prompts < 1:
        raise UserError(f"--max_prompts must be >= 1, got {args.max_prompts}")
    if args.builtin_prompts < 0:
        raise UserError(f"--builtin_prompts must be >= 0, got {args.builtin_prompts}")
    check_source_args(args, "GSM8K JSON Lines: question, answer")
    out_dir = resolve_path(args.data_dir) / "prompts"
    t0 = time.perf_counter()
    source, reason, info = args.source, None, {}
    external: list[dict[str, str]] = []
    if source == "hub":
        reason = probe_hub(DATASET, args.timeout)
        if reason is None:
            try:
                external = hub_prompts(args.split, args.max_prompts, args.timeout)
                info = {"dataset": DATASET, "config": CONFIG, "split": args.split}
            except UserError:
                raise
            except Exception as e:  # `datasets` raises many kinds (connection, auth, missing split)
                reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no details'}"
        if reason is not None:
            fallback(reason, args.no_fallback, DATASET, instead="the built-in prompts only")
            source = "builtin"
    elif source == "local":
        path = resolve_path(args.input)
        external = local_prompts(path, args.max_prompts)
        info = {"input": str(path)}
    if source == "builtin" and args.builtin_prompts == 0:
        raise UserError("no prompts to write: the source is builtin and --builtin_prompts is 0")
    builtin = [{**r, "source": "builtin"} for r in generate_verifiable_prompts(args.builtin_prompts, args.seed)]
    prompts = external + builtin
    random.Random(args.seed).shuffle(prompts)  # mixed, so any prefix holds every task

    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "rl_prompts.jsonl"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in prompts), encoding="utf-8")
    tmp.replace(path)
    n_bytes = path.stat().st_size
    words = sum(len(p["prompt"].split()) for p in prompts)
    seconds = time.perf_counter() - t0
    by_task = dict(sorted(Counter(p["task"] for p in prompts).items()))
    write_json_atomic(out_dir / "rl_prompts.json", {
        "source": source, "requested_source": args.source, "fallback_reason": reason, **info,
        "num_prompts": len(prompts), "num_external": len(external), "num_builtin": len(builtin),
        "by_task": by_task, "words": words, "bytes": n_bytes, "seconds": round(seconds, 3),
        "seed": args.seed, "created": created_now(),
    })
    print(f"download_prompts: {len(prompts):,} prompts ({len(external):,} GSM8K, {len(builtin):,} built-in), "
          f"~{words:,} words (~tokens), {n_bytes:,} bytes in {seconds:.1f} s; source {source} -> {path}",
          flush=True)


if __name__ == "__main__":
    cli_main(main)
