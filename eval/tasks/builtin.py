"""Built-in stand-ins for GSM8K and MMLU, for a machine with neither the data nor the hub.

When no data directory was named (``eval.data_dir`` null), no local copy exists and the Hugging
Face hub cannot be reached, the ``gsm8k`` and ``mmlu`` tasks fall back to the toolkit's own
verifiable arithmetic word problems (`data_pipeline.builtin.generate_verifiable_prompts`), the
same kind the RL stages train on — so the quick start's last step runs offline on a fresh
machine. The fallback is announced on stderr and recorded in the results (``split: builtin``):
these numbers are *not* GSM8K or MMLU numbers. A data directory named on the command line or in
the config never falls back: missing data there stays an error.

* gsm8k: ``question`` = the problem, ``answer`` = ``"The answer is N.\\n#### N"`` (GSM8K's layout,
  so both of lm-eval's filters apply unchanged).
* mmlu: one subject, ``builtin_arithmetic``: the problem with four numeric choices (the answer
  and three distractors near it, in a seeded order); dev questions for the shots.
"""
from __future__ import annotations

import random
import sys
from typing import Any

NUMERIC_TASKS = ("addition", "subtraction", "multiplication", "division", "counting")
SEED = 4242  # not download_prompts' seed: other problems than the RL prompts
SUBJECT = "builtin_arithmetic"


def numeric_problems(n: int, seed: int = SEED) -> list[dict[str, Any]]:
    """``n`` built-in problems whose answer is a whole number: {"question", "value"}."""
    from data_pipeline.builtin import generate_verifiable_prompts

    rows = [r for r in generate_verifiable_prompts(4 * n, seed) if r["task"] in NUMERIC_TASKS]
    return [{"question": r["prompt"], "value": int(r["answer"])} for r in rows[:n]]


def gsm8k_records(n_train: int = 50, n_test: int = 200) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """(train, test) in GSM8K's fields, disjoint."""
    rows = numeric_problems(n_train + n_test)
    recs = [{"question": r["question"], "answer": f"The answer is {r['value']}.\n#### {r['value']}"} for r in rows]
    return recs[:n_train], recs[n_train:]


def choices_for(value: int, rng: random.Random) -> tuple[list[str], int]:
    """Four distinct non-negative numbers, one of them ``value``; (choices, index of the answer)."""
    options = {value}
    for delta in rng.sample([-3, -2, -1, 1, 2, 3, 4, 5, 10], 9):
        if len(options) == 4:
            break
        if value + delta >= 0:
            options.add(value + delta)
    ordered = sorted(options)
    rng.shuffle(ordered)
    return [str(o) for o in ordered], ordered.index(value)


def mmlu_subjects(n_dev: int = 5, n_test: int = 100) -> tuple[dict[str, list[dict]], dict[str, list[dict]]]:
    """(evals, dev) keyed by subject, as `MMLUTask` reads them."""
    rng = random.Random(SEED)
    docs = []
    for r in numeric_problems(n_dev + n_test, SEED + 1):
        choices, answer = choices_for(r["value"], rng)
        docs.append({"subject": SUBJECT, "question": r["question"], "choices": choices, "answer": answer})
    return {SUBJECT: docs[n_dev:]}, {SUBJECT: docs[:n_dev]}


def announce(task: str, reason: str) -> None:
    print(f"WARNING: {task}: {reason}; FALLING BACK to the built-in arithmetic problems (not {task.upper()}: "
          f"pass --data_dir DIR with real data for real numbers)", file=sys.stderr, flush=True)
