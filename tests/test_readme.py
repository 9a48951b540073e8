"""The README runs as written: its commands, in order, in a fresh copy of the repository, offline.

What runs: every fenced ```bash block of README.md, top to bottom; after each block, the
commands in the header comments of the configs that block names (``configs/....yaml``) for the
first time; after the last block, those of the configs named only in the README's prose. A
command is one line, or several joined by a trailing backslash; a config header's commands are
its comment lines indented past the ``#`` that start with a command (``#   python ...``). Each
runs with ``bash -c`` from the copy's root, stdin closed, offline (``HF_HUB_OFFLINE=1``), the
test's virtual environment first on PATH; the first one that exits non-zero fails the test,
named with its file and line. Run with ``-s`` to see every command's time as it finishes.

Two walks, each in a copy of its own: the Quick start (everything above "The pipeline, step by
step"; slow) and the step-by-step sections with everything below them (slow and ``long``: its
training runs take tens of minutes even on idle cores).

Markers (a comment the reader sees too; the test reports every command it does not run and why):

- ``needs: <what>`` ending the comment after a command (on its last line), e.g.
  ``# needs: a GPU`` — the command needs something absent here (a GPU, several machines, the
  network, your own files): it is skipped, reported as "needs <what>". On a comment line of its
  own above a block's first command, it skips the whole block.
- ``runs until Ctrl-C`` in the comment after a command — a server: the test starts it,
  requires it to be still running after `SERVE_S` seconds, then stops it with Ctrl-C (SIGINT).

Without a marker:

- ``make test`` or ``pytest`` — skipped: it would run the test suite, and with it this test.
- ``make demo`` or ``utils/demo.py`` — skipped: it runs the Quick start commands, which this
  test runs itself from the README.
- ``pip install`` — skipped: the test runs in the environment it was started from (and must
  not reinstall this checkout's editable package from the copy). Mark it ``# needs: the
  network`` all the same, for the reader.
- a command that already ran earlier in the walk (the same text, comments and spacing aside;
  config headers repeat the steps before them) — not run twice, reported with where it ran.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import pytest

from utils.paths import REPO_ROOT, shared_data_dir

SERVE_S = 20.0  # a `# runs until Ctrl-C` command must still be up after this long
COMMAND_TIMEOUT_S = 7200  # a hang, not a slow machine (GRPO alone is ~15 min on 2 idle cores)

NEEDS = re.compile(r"#.*?\bneeds:\s*(.+?)\s*$")
RUNS_UNTIL_STOPPED = re.compile(r"#.*\bruns until ctrl-c\b", re.IGNORECASE)
FENCE = re.compile(r"^```(\w*)\s*$")
CONFIG = re.compile(r"configs/[\w./-]+?\.yaml")
HEADER_COMMAND = re.compile(r"^#\s{2,}((?:python|python3|torchrun|make|bash)\s.*)$")


@dataclass(frozen=True)
class Command:
    """One command of the walk: its text as written and where it was written."""

    text: str
    where: str  # "README.md:42" or "configs/sft/full.yaml:5"
    skip: Optional[str] = None  # why it is not run, or None
    serve: bool = False  # `# runs until Ctrl-C`


# ---------------------------------------------------------------- parsing (pure)
def bash_blocks(markdown: str) -> list[tuple[int, list[str]]]:
    """The fenced ```bash blocks: (line number of their first line, their lines)."""
    blocks, current, start = [], None, 0
    for number, line in enumerate(markdown.splitlines(), 1):
        fence = FENCE.match(line.strip())
        if current is None and fence and fence.group(1) == "bash":
            current, start = [], number + 1
        elif current is not None and line.strip() == "```":
            blocks.append((start, current))
            current = None
        elif current is not None:
            current.append(line)
    return blocks


def strip_comment(text: str) -> str:
    """`text` without a trailing shell comment and with its whitespace collapsed (for comparing)."""
    out, quote = [], None
    for i, ch in enumerate(text):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or text[i - 1].isspace()):
            break
        out.append(ch)
    return " ".join("".join(out).replace("\\\n", " ").split())


def skip_reason(text: str) -> Optional[str]:
    """Why a command is not run (a `# needs:` marker or a built-in rule), or None."""
    needs = NEEDS.search(text.splitlines()[-1])
    if needs:
        return f"needs {needs.group(1)}"
    bare = strip_comment(text)
    if re.search(r"\bmake test\b|\bpytest\b", bare):
        return "runs the test suite, this test included"
    if re.search(r"\bmake demo\b|utils/demo\.py", bare):
        return "runs the Quick start commands, which this test runs itself from the README"
    if re.search(r"\bpip install\b", bare):
        return "installs packages; this test runs in the environment it was started from"
    return None


def commands_in(lines: list[str], first_line: int, source: str, header: bool = False) -> list[Command]:
    """The commands of a README block (``header`` False) or of a config's header comments.

    A `# needs:` line before a block's first command skips the whole block."""
    commands, block_skip, pending, pending_at = [], None, [], 0
    for offset, raw in enumerate(lines):
        if header:
            m = HEADER_COMMAND.match(raw) if not pending else re.match(r"^#\s*(.*)$", raw)
            line = m.group(1) if m else None
        else:
            line = raw if raw.strip() and (pending or not raw.lstrip().startswith("#")) else None
            if line is None and not commands and not pending and NEEDS.search(raw):
                block_skip = f"needs {NEEDS.search(raw).group(1)}"
        if line is None:
            continue
        if not pending:
            pending_at = first_line + offset
        pending.append(line.strip() if header else line)
        if not line.rstrip().endswith("\\"):
            text = "\n".join(pending)
            commands.append(Command(text, f"{source}:{pending_at}", skip=block_skip or skip_reason(text),
                                    serve=bool(RUNS_UNTIL_STOPPED.search(text.splitlines()[-1]))))
            pending = []
    if pending:
        raise ValueError(f"{source}:{pending_at}: a command ends with a backslash and nothing follows")
    return commands


def header_lines(config_text: str) -> list[str]:
    """The comment lines at the top of a YAML file, up to its first other line."""
    lines = []
    for line in config_text.splitlines():
        if not line.startswith("#"):
            break
        lines.append(line)
    return lines


def configs_named(text: str) -> list[str]:
    """The ``configs/....yaml`` paths in `text`, each once, in order of first mention."""
    return list(dict.fromkeys(CONFIG.findall(text)))


def split_line(markdown: str, heading: str) -> int:
    """The line number of the heading that starts with `heading` (the walks split there)."""
    for number, line in enumerate(markdown.splitlines(), 1):
        if line.startswith(heading):
            return number
    raise AssertionError(f"README.md has no heading {heading!r}: update tests/test_readme.py")


def walk(root: Path, lines: range) -> Iterator[Command]:
    """The commands of README.md's `lines`, in order (config headers are read when reached:
    the walk may be what writes them)."""
    readme = (root / "README.md").read_text()
    seen: set[str] = set()

    def configs(names: list[str]) -> Iterator[Command]:
        for name in names:
            if name in seen:
                continue
            seen.add(name)
            path = root / name
            if not path.is_file():
                raise AssertionError(f"the README names {name}, which does not exist at this point of the walk")
            yield from commands_in(header_lines(path.read_text()), 1, name, header=True)

    for first_line, block in bash_blocks(readme):
        if first_line in lines:
            yield from commands_in(block, first_line, "README.md")
            yield from configs(configs_named("\n".join(block)))
    yield from configs(configs_named("\n".join(readme.splitlines()[lines.start - 1:lines.stop - 1])))


# ---------------------------------------------------------------- running
def fresh_copy(dest: Path) -> Path:
    """The tracked files of this working tree (as they are now) copied to `dest`."""
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=REPO_ROOT, capture_output=True, check=True).stdout
    for rel in filter(None, listed.decode().split("\0")):
        src = REPO_ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest


def walk_env(root: Path) -> dict[str, str]:
    """The environment of a user who installed the copy and has no network.

    PYTHONPATH puts the copy's packages first: the virtual environment has *this* checkout
    installed editable, which would otherwise be imported (and write under this checkout)."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "PYTHONPATH", "VIRTUAL_ENV")}
    env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}", PYTHONPATH=str(root),
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    data = shared_data_dir()
    if data is not None:  # the eval data the README points at ($LLM_DATA_DIR, else ../shared/data)
        env["LLM_DATA_DIR"] = str(data)
    return env


def _tail(text: str, n: int = 4000) -> str:
    return text if len(text) <= n else "..." + text[-n:]


def run_command(cmd: Command, root: Path, env: dict[str, str]) -> None:
    """Run one command; an AssertionError naming it (with its output's tail) if it fails."""
    if not cmd.serve:
        proc = subprocess.run(["bash", "-c", cmd.text], cwd=root, env=env, stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=COMMAND_TIMEOUT_S)
        if proc.returncode != 0:
            raise AssertionError(f"{cmd.where}: exit {proc.returncode}: {cmd.text}\n{_tail(proc.stdout)}")
        return
    with open(root / ".readme_test_server.log", "w+") as log:
        proc = subprocess.Popen(["bash", "-c", f"exec {cmd.text}"], cwd=root, env=env, stdin=subprocess.DEVNULL,
                                stdout=log, stderr=subprocess.STDOUT)
        try:
            proc.wait(timeout=SERVE_S)
        except subprocess.TimeoutExpired:  # still serving: what it should do
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=60)
            return
        log.seek(0)
        raise AssertionError(f"{cmd.where}: stopped on its own within {SERVE_S:.0f}s (exit {proc.returncode}): "
                             f"{cmd.text}\n{_tail(log.read())}")


def first_line(cmd: Command) -> str:
    line = cmd.text.splitlines()[0]
    return line if len(line) <= 110 else line[:107] + "..."


def and_parts(bare: str) -> list[str]:
    """A command and the commands it chains with `&&` (each of them has run when it has)."""
    parts = [p.strip() for p in bare.split(" && ")]
    return [bare] + (parts if len(parts) > 1 else [])


def run_walk(root: Path, lines: range) -> None:
    """Run the README's commands in `lines` (and their configs') in order; print each one's time."""
    env = walk_env(root)
    ran: dict[str, str] = {}  # command without comments -> where it ran
    skipped = 0
    start = time.monotonic()
    for cmd in walk(root, lines):
        bare = strip_comment(cmd.text)
        if cmd.skip or bare in ran:
            skipped += 1
            print(f"  skipped  {cmd.where}: {first_line(cmd)}  [{cmd.skip or f'ran above ({ran[bare]})'}]", flush=True)
            continue
        t0 = time.monotonic()
        run_command(cmd, root, env)
        ran.update(dict.fromkeys(and_parts(bare), cmd.where))
        print(f"  {time.monotonic() - t0:6.1f}s  {cmd.where}: {first_line(cmd)}", flush=True)
    print(f"README walk: {time.monotonic() - start:.0f}s, {len(set(ran.values()))} commands run, {skipped} not run "
          f"(load average now {os.getloadavg()[0]:.1f})", flush=True)
    assert ran, "no command to run found"


STEP_BY_STEP = "## The pipeline, step by step"


@pytest.mark.slow
def test_readme_quick_start_runs_as_written(tmp_path: Path) -> None:
    """Everything above the step-by-step sections (the Quick start)."""
    root = fresh_copy(tmp_path / "repo")
    run_walk(root, range(1, split_line((root / "README.md").read_text(), STEP_BY_STEP)))


@pytest.mark.slow
@pytest.mark.long
def test_readme_step_by_step_runs_as_written(tmp_path: Path) -> None:
    """The step-by-step sections and everything after them, in a copy of their own (they start
    from the data again)."""
    root = fresh_copy(tmp_path / "repo")
    readme = (root / "README.md").read_text()
    run_walk(root, range(split_line(readme, STEP_BY_STEP), len(readme.splitlines()) + 1))


# ---------------------------------------------------------------- the parser itself (fast)
def test_parser_on_a_small_readme() -> None:
    md = "\n".join([
        "# T", "```bash", "python a.py && \\", "python b.py   # then b", "python c.py --x 1   # needs: a GPU",
        "#   a continuation comment", "make test", "pip install -r r.txt", "```", "text configs/x/y.yaml", "```python", "print(1)", "```",
        "```bash", "# needs: several machines", "torchrun --nnodes=2 d.py", "```",
        "```bash", "python server.py   # API on :8000; runs until Ctrl-C", "```",
    ])
    blocks = bash_blocks(md)
    assert [b[0] for b in blocks] == [3, 15, 19]
    first = commands_in(blocks[0][1], blocks[0][0], "README.md")
    assert [(c.where, c.skip) for c in first] == [
        ("README.md:3", None), ("README.md:5", "needs a GPU"),
        ("README.md:7", "runs the test suite, this test included"),
        ("README.md:8", "installs packages; this test runs in the environment it was started from")]
    assert first[0].text == "python a.py && \\\npython b.py   # then b"
    assert strip_comment(first[0].text) == "python a.py && python b.py"
    assert [c.skip for c in commands_in(blocks[1][1], 15, "R")] == ["needs several machines"]
    assert commands_in(blocks[2][1], 19, "R")[0].serve
    assert configs_named(md + " configs/x/y.yaml configs/a.yaml") == ["configs/x/y.yaml", "configs/a.yaml"]
    assert and_parts("a && b") == ["a && b", "a", "b"] and and_parts("a") == ["a"]
    assert split_line(md, "# T") == 1


def test_parser_on_a_config_header() -> None:
    text = "\n".join([
        "# A tiny run. Build the data first:", "#", "#   python prep.py      # offline: built-in",
        "#   python train.py --config_path c.yaml \\", "#       --set a=1", "#", "# Chat with: python chat.py",
        "model:", "#   python not_header.py",
    ])
    cmds = commands_in(header_lines(text), 1, "c.yaml", header=True)
    assert [(c.where, c.text) for c in cmds] == [
        ("c.yaml:3", "python prep.py      # offline: built-in"),
        ("c.yaml:4", "python train.py --config_path c.yaml \\\n--set a=1")]
    assert strip_comment('python x.py --prompt "a # b"  # c') == 'python x.py --prompt "a # b"'
