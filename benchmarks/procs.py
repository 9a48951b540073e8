"""What the benchmarks that measure in worker processes share (`rl_speed.py`, `preference_speed.py`,
`sft_memory.py`): progress lines and the JSON report, this process's resident-set figures, and the
two ends of a coordinator ↔ worker-process protocol (one process per variant, so the peaks of the
variants never mix).

Memory, in MiB: ``rss_mb`` (now), ``peak_rss_mb`` (``VmHWM``), ``ru_maxrss_mb`` (``getrusage``)
and ``reset_peak_rss``. On Linux, writing 5 to /proc/self/clear_refs resets ``VmHWM`` to the
current resident set, and the reset clears ``ru_maxrss`` too: a whole-life peak across a reset
is the larger of ``ru_maxrss`` read just before it and at the end. A child's ``ru_maxrss`` starts
at its parent's resident set at the fork (the image before ``exec`` counts), so start the
workers while the coordinator is still small. ``ru_maxrss`` is KiB on Linux, bytes on macOS.

Protocol: the coordinator starts ``python SCRIPT --_worker ARGS...`` (`WorkerProcess`: the repo
root as working directory and on PYTHONPATH, ``threads`` OpenMP / MKL threads, stderr to a log
file); the worker (`Channel`) reads one JSON command a line on stdin and answers with JSON lines
on a private copy of its stdout (fd 1 itself then points at stderr, so library prints cannot
corrupt the stream). A message ``{"event": "error", "error": ..., ["traceback": ...]}`` becomes
a RuntimeError on the coordinator's side, with the traceback (else the log's tail).
"""
from __future__ import annotations

import argparse
from abc import ABC, abstractmethod
import json
import os
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

REPO = Path(__file__).resolve().parent.parent


def log(msg: str) -> None:
    """A progress line on stderr (stdout is for the JSON report alone)."""
    print(msg, file=sys.stderr, flush=True)


def emit_report(report: dict, out: Optional[str] = None) -> str:
    """Print the report as indented JSON on stdout and, given ``out``, write it there too."""
    text = json.dumps(report, indent=2)
    print(text)
    if out:
        Path(out).write_text(text + "\n")
    return text


def rotated(items: Sequence, r: int) -> list:
    """``items`` starting at index ``r`` (mod its length): who goes first in round ``r``."""
    k = r % len(items)
    return list(items[k:]) + list(items[:k])


# ---------------------------------------------------------------------------- memory
def status_kib(field: str) -> Optional[int]:
    """A ``kB`` field of /proc/self/status (``VmRSS``, ``VmHWM``); None where there is none."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_mb() -> float:
    """Current resident set (MiB)."""
    kib = status_kib("VmRSS")
    if kib is None:
        import psutil

        return psutil.Process().memory_info().rss / 2**20
    return kib / 1024


def ru_maxrss_mb() -> float:
    """This process's peak resident set (MiB) from getrusage (KiB on Linux, bytes on macOS)."""
    ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return ru / 2**20 if sys.platform == "darwin" else ru / 1024


def peak_rss_mb() -> float:
    """This process's peak resident set (MiB): VmHWM on Linux (since the last `reset_peak_rss`),
    else ru_maxrss."""
    kib = status_kib("VmHWM")
    return ru_maxrss_mb() if kib is None else kib / 1024


def reset_peak_rss() -> bool:
    """Start a new peak: Linux resets VmHWM (and with it ``ru_maxrss``) to the current resident
    set on writing 5 to /proc/self/clear_refs; False where that is refused."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return status_kib("VmHWM") is not None


# ---------------------------------------------------------------------------- worker side
def parse_args_or_serve(p: argparse.ArgumentParser, worker_main: Callable[..., None],
                        *metavar: str) -> Optional[argparse.Namespace]:
    """Parse the command line, or, started as a worker (``--_worker ARG...``, one per ``metavar``:
    what `WorkerProcess` passes), run ``worker_main(*ARGs)`` and return None."""
    p.add_argument("--_worker", nargs=len(metavar), metavar=metavar, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._worker:
        worker_main(*args._worker)
        return None
    return args


class Channel:
    """The worker's end of the protocol: JSON lines on a private copy of stdout (fd 1 itself
    then points at stderr, so library prints cannot corrupt it), commands on stdin."""

    def __init__(self) -> None:
        self.out = os.fdopen(os.dup(1), "w", buffering=1)
        os.dup2(2, 1)
        sys.stdout = sys.stderr

    def send(self, msg: dict) -> None:
        self.out.write(json.dumps(msg) + "\n")
        self.out.flush()

    def receive(self) -> dict:
        line = sys.stdin.readline()
        if not line:
            raise SystemExit("coordinator went away")
        return json.loads(line)


# ---------------------------------------------------------------------------- coordinator side
class WorkerProcess(ABC):
    """The coordinator's end: ``python script --_worker *argv`` from the repo root, with
    ``threads`` OpenMP / MKL threads (``env`` adds or overrides variables), stderr to
    ``log_path``. ``info`` gathers the fields of the messages read by `update_info`."""

    def __init__(self, name: str, script: str | Path, argv: Sequence[str], log_path: Path, threads: int,
                 env: Optional[dict[str, str]] = None) -> None:
        self.name, self.log_path = name, log_path
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
               "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1",
               "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
               **(env or {})}
        self.log_file = open(log_path, "w")
        self.proc = subprocess.Popen([sys.executable, str(Path(script).resolve()), "--_worker", *argv],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log_file, text=True,
                                     cwd=REPO, env=env)
        self.info: dict[str, Any] = {}

    def read(self) -> dict:
        """The worker's next message; a RuntimeError where it exited or reported an error."""
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            raise RuntimeError(f"worker {self.name} exited ({self.proc.returncode}); its log ends:\n"
                               f"{self.log_path.read_text()[-4000:]}")
        msg = json.loads(line)
        if msg.get("event") == "error":
            detail = msg["traceback"] if "traceback" in msg else self.log_path.read_text()
            raise RuntimeError(f"worker {self.name} failed: {msg['error']}\n{detail[-4000:]}")
        return msg

    @abstractmethod
    def run(self, n: int, measured: bool) -> None:
        """Have the worker run ``n`` steps and keep what it reports (the benchmark's own)."""

    def send(self, msg: dict) -> None:
        self.proc.stdin.write(json.dumps(msg) + "\n")
        self.proc.stdin.flush()

    def update_info(self) -> dict:
        """Read the next message into ``info``; returns it."""
        msg = self.read()
        self.info.update(msg)
        return msg

    def stop(self) -> None:
        """Ask the worker to finish, read its last message into ``info``, wait for it to exit."""
        self.send({"cmd": "stop"})
        self.update_info()
        self.proc.wait(timeout=120)
        self.log_file.close()

    def kill(self) -> None:
        """Make sure the worker is gone (safe after `stop`, and more than once)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if not self.log_file.closed:
            self.log_file.close()


def take_turns(workers: Sequence[WorkerProcess], warmup: int, rounds: int, steps_per_round: int,
               progress: Callable[[int], None]) -> None:
    """``warmup`` unmeasured steps of each worker in turn, then ``rounds`` rounds in which each worker
    runs ``steps_per_round`` measured steps while the others wait, the order rotating each round
    (so background load hits all alike; ``progress(r)`` after round r), then stop them all."""
    for w in workers:
        if warmup:
            w.run(warmup, measured=False)
    for r in range(rounds):
        for w in rotated(workers, r):
            w.run(steps_per_round, measured=True)
        progress(r)
    for w in workers:
        w.stop()
