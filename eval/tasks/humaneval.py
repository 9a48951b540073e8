"""HumanEval (Chen et al., 2021): complete each function from its prompt, run the tests in the sandbox.

As lm-evaluation-harness's ``humaneval`` task: zero-shot, the prompt (signature + docstring) is
the context, the completion stops at "\\nclass", "\\ndef", "\\n#", "\\nif" or "\\nprint" (1024 new
tokens at most), and the program ``prompt + completion + test + check(entry_point)`` runs in
`eval.sandbox` (own process, time / memory / process / file limits, throwaway directory, no
network; results.json says which network isolation the machine gave).

``--samples_per_task n`` draws n completions per problem: greedy when n = 1, otherwise
temperature 0.2 and top-p 0.95 (lm-eval's ``humaneval_64``) unless the config sets them; the
completions of a request draw with seeds seed, seed + 1, ... pass@k is the unbiased estimator
(`eval.pass_at_k`) for k = 1 and 10, each where k <= n. HumanEval is always a plain completion of
the code (``--chat`` applies to gsm8k and mmlu).

Data: ``<data_dir>/humaneval/HumanEval.jsonl.gz`` (or ``.jsonl``), else ``openai/openai_humaneval``
from the hub. ``--limit N`` takes the first N problems.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from eval.requests import GenerateUntil
from eval.tasks import Task, hub_rows, metric
from utils.errors import UserError

UNTIL = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
MAX_GEN_TOKS = 1024
KS = (1, 10)


class HumanEvalTask(Task):
    name = "humaneval"
    kind = "generate_until"

    def load(self, model: Any) -> None:
        from eval.humaneval_exec import load_problems

        root = self._data_path("humaneval") if self.settings.data_dir is not None else Path("humaneval")
        path = next((p for p in (root / "HumanEval.jsonl.gz", root / "HumanEval.jsonl") if p.is_file()), None)
        if path is not None:
            problems = load_problems(path)
            self._record_files([path])
        else:
            rows = hub_rows("openai/openai_humaneval", None, "test", root / "HumanEval.jsonl.gz", self.name)
            problems = [{k: r[k] for k in ("task_id", "prompt", "entry_point", "canonical_solution", "test")}
                        for r in rows]
        if self.settings.limit is not None:
            problems = problems[: self.settings.limit]
        s = self.settings
        self.n = s.samples_per_task
        sampling = self.n > 1
        self.temperature = s.temperature if s.temperature is not None else (0.2 if sampling else 0.0)
        self.top_p = s.top_p if s.top_p is not None else (0.95 if sampling else 1.0)
        if sampling and self.temperature == 0:
            raise UserError(f"--samples_per_task {self.n} with temperature 0 gives {self.n} identical completions: "
                            "set a temperature > 0")
        self.max_gen_toks = s.max_gen_toks or MAX_GEN_TOKS
        self.docs = problems
        from eval.sandbox import network_isolation

        self.info = {"samples_per_task": self.n, "temperature": self.temperature, "top_p": self.top_p,
                     "seed": s.seed, "until": list(UNTIL), "max_gen_toks": self.max_gen_toks,
                     "timeout_s": s.timeout, "sandbox_network": network_isolation(), "shots": 0}

    def requests(self, doc: dict[str, Any]) -> list[GenerateUntil]:
        return [GenerateUntil(doc["prompt"], UNTIL, self.max_gen_toks, temperature=self.temperature,
                              top_p=self.top_p, n=self.n, seed=self.settings.seed)]

    def score(self, docs: list[dict[str, Any]], answers: list[list[Any]]) -> list[dict[str, Any]]:
        from eval.humaneval_exec import evaluate_completions

        completions = {doc["task_id"]: list(texts) for doc, (texts,) in zip(docs, answers)}
        self.report = evaluate_completions(docs, completions, k=KS, workers=self.settings.workers,
                                           timeout=self.settings.timeout)
        records = []
        for doc in docs:
            task = self.report["tasks"][doc["task_id"]]
            records.append({
                "task_id": doc["task_id"], "prompt": doc["prompt"], "output": completions[doc["task_id"]],
                "extracted": completions[doc["task_id"]], "target": doc["entry_point"],
                "correct": [r["status"] == "passed" for r in task["results"]],
                "status": [r["status"] for r in task["results"]], "n": task["n"], "c": task["c"],
            })
        return records

    def aggregate(self, records: list[dict[str, Any]]) -> dict[str, dict[str, Optional[float]]]:
        return {name: metric(value, self.report["stderr"][name]) for name, value in self.report["pass_at_k"].items()}
