"""What an evaluation writes under ``--out``: results.json, results.md, samples_<task>.jsonl.

- ``results.json``: the model (what it is, where from), the settings, and per task every metric
  with its standard error, the sample and request counts, the seconds, the task's own settings
  (split, shots, seeds, sandbox network isolation) and the sha256 of each data file read.
- ``results.md``: one markdown table (task, metric, value, ± stderr), lm-eval's layout; MMLU's
  subjects in a second table.
- ``samples_<task>.jsonl``: one line per sample: prompt, output, extracted answer, target,
  correctness (and what the task adds: log-likelihoods, statuses, counts).

Files are written to a temporary name and renamed, so a crash never leaves half a results.json.
"""
from __future__ import annotations

import json
import math
import os
import platform
import time
from pathlib import Path
from typing import Any, Iterable

from eval.runner import TaskResult

SUBJECT_PREFIX = "acc_subject/"


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _fmt(x: Any) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "N/A"
    return f"{x:.4f}"


def results_dict(model: dict, settings: dict, results: Iterable[TaskResult]) -> dict:
    import torch

    return {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "model": model,
        "settings": settings,
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
        "results": {
            r.name: {"metrics": r.metrics, "n_samples": r.n_samples, "n_requests": r.n_requests,
                     "seconds": round(r.seconds, 3), "task_settings": r.info, "data_sha256": r.files}
            for r in results
        },
    }


def markdown_table(data: dict) -> str:
    model = data["model"]
    title = model.get("checkpoint") or f"{model.get('model')} at {model.get('base_url')}"
    lines = [f"# Evaluation of {title}", "", "| Task | Metric | Samples | Value | ± Stderr |", "|---|---|---:|---:|---:|"]
    subjects = []
    for task, res in data["results"].items():
        for name, m in res["metrics"].items():
            if name.startswith(SUBJECT_PREFIX):
                subjects.append((name[len(SUBJECT_PREFIX):], m))
                continue
            lines.append(f"| {task} | {name} | {res['n_samples']} | {_fmt(m['value'])} | {_fmt(m['stderr'])} |")
    if subjects:
        lines += ["", "## MMLU subjects", "", "| Subject | acc | ± Stderr |", "|---|---:|---:|"]
        lines += [f"| {s} | {_fmt(m['value'])} | {_fmt(m['stderr'])} |" for s, m in subjects]
    return "\n".join(lines) + "\n"


def write_results(out: Path, model: dict, settings: dict, results: list[TaskResult]) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    data = results_dict(model, settings, results)
    for r in results:
        body = "".join(json.dumps(rec, ensure_ascii=False) + "\n" for rec in r.records)
        _atomic_write(out / f"samples_{r.name}.jsonl", body)
    _atomic_write(out / "results.md", markdown_table(data))
    _atomic_write(out / "results.json", json.dumps(data, indent=2, allow_nan=False) + "\n")
    return data
