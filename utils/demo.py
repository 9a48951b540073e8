"""`make demo`: the README's quick start, run exactly as written, in order.

The commands are read from the first ``bash`` block under "## Quick start" in README.md (so the
demo and the README cannot drift apart) and run one by one with ``bash -c`` from the repo root, with
this interpreter's directory first on PATH (so ``python`` is the .venv's). Two things differ from typing them by hand, both said on screen:

* ``pip install ...`` lines are skipped: `make` has just installed the requirements into .venv.
* ``inference/chat.py`` gets one message on stdin (then end of input), so it answers once and exits.

Before starting, the run directories the quick start's configs write (their ``logging.run_dir``
and ``output.out``) are cleared, so a second ``make demo`` starts fresh instead of refusing to
overwrite the first one's checkpoints. At the end: each command's wall time, the stages' losses,
and the evaluation table.

    python utils/demo.py [--dry_run]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

from utils.config import read_yaml
from utils.errors import UserError, cli_main
from utils.paths import REPO_ROOT, resolve_path

QUICK_START = "## Quick start"
CHAT_MESSAGE = "Tom has 3 apples and buys 4 more. How many apples does Tom have now?"


def quick_start_commands(readme: str) -> list[str]:
    """The logical command lines (backslash continuations joined, comments dropped) of the first
    ``bash`` block after the "## Quick start" heading."""
    start = readme.find(QUICK_START)
    if start < 0:
        raise UserError(f"README.md has no '{QUICK_START}' section")
    block = re.search(r"```bash\n(.*?)```", readme[start:], re.S)
    if block is None:
        raise UserError(f"README.md's '{QUICK_START}' section has no ```bash block")
    commands, pending = [], ""
    for raw in block.group(1).splitlines():
        line = raw.rstrip()
        if pending:
            line = pending + " " + line.strip()
            pending = ""
        if line.endswith("\\"):
            pending = line[:-1].rstrip()
            continue
        code = strip_comment(line).strip()
        if code:
            commands.append(code)
    return commands


def strip_comment(line: str) -> str:
    """``cmd  # note`` → ``cmd``: a ``#`` at the start of a word, outside quotes, starts a comment."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i]
    return line


def outputs_of(command: str) -> list[Path]:
    """The run directories a stage command's config writes (its --config_path's logging.run_dir /
    output.out), so a rerun of the demo can clear them."""
    words = shlex.split(command)
    if "--config_path" not in words:
        return []
    config = resolve_path(words[words.index("--config_path") + 1], REPO_ROOT)
    if not config.is_file():
        return []
    cfg = read_yaml(config)
    found = [cfg.get("logging", {}).get("run_dir"), cfg.get("output", {}).get("out")]
    return [resolve_path(p, REPO_ROOT) for p in found if p]


def summary_line(run: Path) -> Optional[str]:
    metrics = run / "metrics.jsonl"
    if not metrics.is_file():
        return None
    rows = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
    parts = []
    for key in ("loss", "val_loss", "reward", "val_reward"):
        values = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
        if values:
            parts.append(f"{key} {values[0]:.3f} -> {values[-1]:.3f}")
    return f"  {run.relative_to(REPO_ROOT)}: " + ", ".join(parts) if parts else None


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry_run", action="store_true", help="print the commands, run nothing")
    args = ap.parse_args(argv)
    commands = quick_start_commands((REPO_ROOT / "README.md").read_text())
    if args.dry_run:
        print("\n".join(commands))
        return
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    timings: list[tuple[str, float]] = []
    runs: list[Path] = []
    t_all = time.time()
    for i, command in enumerate(commands, 1):
        print(f"\n[demo {i}/{len(commands)}] {command}", flush=True)
        if command.startswith("pip install"):
            print("[demo] skipped: make has installed the requirements into .venv", flush=True)
            continue
        for out in outputs_of(command):
            if out.exists():
                print(f"[demo] clearing {out.relative_to(REPO_ROOT)} (the previous demo's run)", flush=True)
                shutil.rmtree(out)
            runs.append(out)
        chat = "inference/chat.py" in command
        if chat:
            print(f"[demo] you> {CHAT_MESSAGE}", flush=True)
        t0 = time.time()
        proc = subprocess.run(["bash", "-c", command], cwd=REPO_ROOT, env=env, input=CHAT_MESSAGE + "\n" if chat else None,
                              stdin=None if chat else subprocess.DEVNULL, text=True)
        if proc.returncode != 0:
            print(f"[demo] step {i} failed with exit code {proc.returncode}: {command}", file=sys.stderr)
            raise SystemExit(proc.returncode)
        timings.append((command, time.time() - t0))
        print(f"[demo {i}/{len(commands)}] done in {timings[-1][1]:.1f}s", flush=True)

    print(f"\n[demo] the quick start ran in {time.time() - t_all:.0f}s on {os.cpu_count()} CPU cores:")
    for command, seconds in timings:
        print(f"  {seconds:6.1f}s  {command}")
    lines = [line for line in (summary_line(r) for r in runs) if line]
    if lines:
        print("[demo] training:")
        print("\n".join(lines))
    for run in runs:
        if (run / "results.md").is_file():
            print(f"[demo] evaluation ({run.relative_to(REPO_ROOT)}/results.md):")
            print((run / "results.md").read_text().split("\n## ")[0].strip())


if __name__ == "__main__":
    cli_main(main)
