"""The one evaluation runner: every task's requests to the model in one call per task, then scores.

For each task: load its data, build every sample's requests, hand them all to the model's method
for the task's request kind (the model batches them: shared-prefix forwards for log-likelihoods,
continuous batching for generation, a thread pool of HTTP calls for a server), put the answers
back per sample, score the samples and aggregate the metrics. A progress bar runs per task (tqdm
on a terminal; a plain log line every ~10 % or 30 s otherwise, so logs stay readable).
"""
from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Optional

from tqdm import tqdm

from eval.tasks import Task
from utils.errors import UserError

log = logging.getLogger("eval")


class Progress:
    """Counts finished requests of one task: a tqdm bar on a TTY, periodic log lines otherwise."""

    def __init__(self, desc: str, total: int, stream=None) -> None:
        self.desc, self.total, self.done = desc, total, 0
        self.stream = stream or sys.stderr
        self.start = self.last = time.monotonic()
        self.next_fraction = 0.1
        self.bar = tqdm(total=total, desc=desc, unit="req", file=self.stream) if self.stream.isatty() else None

    def __call__(self, n: int) -> None:
        if n <= 0:
            return
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.monotonic()
        if self.done >= self.total or self.done >= self.next_fraction * self.total or now - self.last >= 30:
            while self.next_fraction * self.total <= self.done:
                self.next_fraction += 0.1
            self.last = now
            rate = self.done / max(now - self.start, 1e-9)
            print(f"{self.desc}: {self.done}/{self.total} requests ({self.done / max(self.total, 1):.0%}, "
                  f"{rate:.1f}/s)", file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@dataclass
class TaskResult:
    name: str
    metrics: dict[str, dict[str, Optional[float]]]
    records: list[dict[str, Any]]
    n_samples: int
    n_requests: int
    seconds: float
    files: dict[str, str] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)


def _answer(task: Task, model: Any, requests: list[Any], progress: Progress) -> list[Any]:
    if task.kind == "loglikelihood":
        return model.loglikelihood(requests, progress=progress)
    if task.kind == "loglikelihood_rolling":
        return model.loglikelihood_rolling(requests, stride=task.settings.ppl_stride, progress=progress)
    if task.kind == "generate_until":
        return model.generate_until(requests, progress=progress)
    raise ValueError(f"unknown request kind {task.kind!r}")


def check_supported(tasks: list[Task], model: Any) -> None:
    """Fail before any work when the backend cannot answer a task's request kind."""
    generation_only = not hasattr(model, "loglikelihood_tokens")
    for task in tasks:
        if generation_only and task.kind != "generate_until":
            raise UserError(f"task {task.name} needs log-likelihoods, which an OpenAI-compatible server does not "
                            "return: evaluate it with --checkpoint")


def run_task(task: Task, model: Any) -> TaskResult:
    """Request, score and aggregate one task (`task.load` has run)."""
    start = time.perf_counter()
    per_doc = [task.requests(doc) for doc in task.docs]
    flat = [r for rs in per_doc for r in rs]
    progress = Progress(task.name, len(flat))
    try:
        answers = _answer(task, model, flat, progress)
    finally:
        progress.close()
    grouped, i = [], 0
    for rs in per_doc:
        grouped.append(answers[i:i + len(rs)])
        i += len(rs)
    records = task.score(task.docs, grouped)
    metrics = task.aggregate(records)
    seconds = time.perf_counter() - start
    return TaskResult(task.name, metrics, records, len(task.docs), len(flat), seconds, dict(task.files),
                      dict(task.info))
