"""Evaluation tasks: each turns its samples into requests (`eval.requests`) and scores the answers.

A `Task` reads its data (`load`), says which request kind it needs (`kind`) and which requests
each sample asks (`requests`), turns each sample's answers into a record (`score`: prompt, output,
extracted answer, target, correctness and per-sample metric values) and the records into metrics
with standard errors (`aggregate`). Where a convention exists, it is lm-evaluation-harness's.

    ppl        token perplexity of a token bin or text file, + word / byte perplexity, bits per byte
    mmlu       MMLU, 5-shot from dev, log-likelihood of " A" .. " D"
    gsm8k      GSM8K, 5-shot "Question: .. Answer:", greedy, strict-match and flexible-extract
    humaneval  HumanEval completions run against the tests in the sandbox, pass@k
"""
from __future__ import annotations

import difflib
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from data_pipeline.formats import file_sha256
from utils.errors import UserError

TASK_NAMES = ("ppl", "mmlu", "gsm8k", "humaneval")


@dataclass
class TaskSettings:
    """What the user chose (None: the task's default, as lm-eval's)."""

    data_dir: Optional[Path] = None  # None: no local data (the hub, when online)
    limit: Optional[int] = None  # samples per task (MMLU: per subject, as lm-eval)
    shots: Optional[int] = None
    chat: bool = False
    samples_per_task: int = 1  # HumanEval completions per problem
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    max_gen_toks: Optional[int] = None
    seed: int = 1234  # lm-eval's few-shot seed; sampling seeds too
    ppl_data: Optional[Path] = None
    ppl_stride: Optional[int] = None
    timeout: float = 10.0  # HumanEval: seconds per program
    workers: int = 2  # HumanEval: programs run at once
    # no data directory was named: gsm8k / mmlu may fall back to the built-in problems when
    # neither local data nor the hub is there (`eval.tasks.builtin`, announced loudly)
    builtin_fallback: bool = False


def mean(values: Sequence[float]) -> float:
    return math.fsum(values) / len(values) if values else float("nan")


def mean_stderr(values: Sequence[float]) -> float:
    """lm-eval's ``mean_stderr``: sample standard deviation (ddof 1) / sqrt(n); NaN below 2 values."""
    n = len(values)
    if n < 2:
        return float("nan")
    m = mean(values)
    return math.sqrt(math.fsum((v - m) ** 2 for v in values) / (n - 1) / n)


def pooled_stderr(stderrs: Sequence[float], sizes: Sequence[int]) -> float:
    """lm-eval's ``pooled_sample_stderr``: the stderr of a group's size-weighted mean."""
    if sum(sizes) - len(sizes) <= 0:
        return float("nan")
    var = math.fsum((n - 1) * (0.0 if math.isnan(s) else s) ** 2 * n for s, n in zip(stderrs, sizes))
    return math.sqrt(var / (sum(sizes) - len(sizes)) / sum(sizes))


def metric(value: float, stderr: float = float("nan")) -> dict[str, Optional[float]]:
    """A metric as results.json stores it (NaN → null)."""
    return {"value": None if math.isnan(value) else value, "stderr": None if math.isnan(stderr) else stderr}


class Task(ABC):
    """Base class; see the module docstring."""

    name: str = ""
    kind: str = ""  # "loglikelihood" | "loglikelihood_rolling" | "generate_until"

    def __init__(self, settings: TaskSettings) -> None:
        self.settings = settings
        self.docs: list[dict[str, Any]] = []
        self.files: dict[str, str] = {}  # data file -> sha256
        self.info: dict[str, Any] = {}  # settings the results should record (split, shots, ...)

    @abstractmethod
    def load(self, model: Any) -> None:
        """Read the task's data (and settings the model decides, e.g. its max length) into ``self.docs``."""

    @abstractmethod
    def requests(self, doc: dict[str, Any]) -> list[Any]:
        """The requests (loglikelihood / loglikelihood_rolling / generate_until) one document needs."""

    @abstractmethod
    def score(self, docs: list[dict[str, Any]], answers: list[list[Any]]) -> list[dict[str, Any]]:
        """One record per document from the answers to its requests (prediction, target, correctness, ...)."""

    @abstractmethod
    def aggregate(self, records: list[dict[str, Any]]) -> dict[str, dict[str, Optional[float]]]:
        """The task's metrics from the records: ``{metric: {"value": v, "stderr": se}}``."""

    def _record_files(self, paths: Sequence[Path]) -> None:
        for p in paths:
            self.files[str(p)] = file_sha256(p)

    def _data_path(self, *parts: str) -> Path:
        """``<data_dir>/<parts>``, or a UserError saying where the data should be."""
        if self.settings.data_dir is None:
            raise UserError(f"{self.name}: no data directory (pass --data_dir DIR holding {'/'.join(parts)})")
        return self.settings.data_dir.joinpath(*parts)


def unknown_task_message(name: str) -> str:
    hint = difflib.get_close_matches(name, TASK_NAMES, n=1, cutoff=0.5)
    tail = f" — did you mean {hint[0]}?" if hint else ""
    return f"unknown task {name!r}{tail} (tasks: {', '.join(TASK_NAMES)})"


def make_task(name: str, settings: TaskSettings) -> Task:
    if name == "ppl":
        from eval.tasks.ppl import PerplexityTask as cls
    elif name == "mmlu":
        from eval.tasks.mmlu import MMLUTask as cls
    elif name == "gsm8k":
        from eval.tasks.gsm8k import GSM8KTask as cls
    elif name == "humaneval":
        from eval.tasks.humaneval import HumanEvalTask as cls
    else:
        raise UserError(unknown_task_message(name))
    return cls(settings)


def hub_rows(repo_id: str, config: Optional[str], split: str, missing: Path, task: str) -> list[dict[str, Any]]:
    """Rows of a hub dataset when the local file `missing` is absent; offline → a UserError."""
    from data_pipeline.download.sources import HUB_TIMEOUT_S, probe_hub, stream_hub

    reason = probe_hub(repo_id, HUB_TIMEOUT_S)
    if reason is not None:
        raise UserError(f"{task}: no data at {missing} and the Hugging Face hub cannot be used ({reason}); "
                        f"pass --data_dir DIR (e.g. ../shared/data)")
    try:
        return list(stream_hub(repo_id, config, split, None, HUB_TIMEOUT_S, f"{task} from the hub"))
    except Exception as e:  # datasets raises many kinds; any of them means: no data
        raise UserError(f"{task}: no data at {missing} and {repo_id} could not be read from the hub "
                        f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
