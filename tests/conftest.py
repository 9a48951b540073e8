"""Shared fixtures: real public data (skipped with a reason when absent), script runner."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from utils.paths import REPO_ROOT, shared_data_dir


@pytest.fixture(scope="session")
def shared_data() -> Path:
    d = shared_data_dir()
    if d is None:
        pytest.skip("shared real data not found (set LLM_DATA_DIR or place it at ../shared/data)")
    return d


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


def run_script(args: list[str], cwd: Path | None = None, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `python <args>` like a user would (from `cwd`, default the repo root)."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, *args], cwd=cwd or REPO_ROOT, env=full_env, capture_output=True, text=True, timeout=timeout
    )


def assert_user_error(proc: subprocess.CompletedProcess, contains: str | None = None) -> str:
    """Exit code 2, exactly one non-empty stderr line, no traceback; returns that line."""
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2, f"exit {proc.returncode}, stderr:\n{proc.stderr}"
    assert "Traceback" not in proc.stderr, proc.stderr
    assert len(lines) == 1, f"expected one stderr line, got:\n{proc.stderr}"
    if contains is not None:
        assert contains in lines[0], lines[0]
    return lines[0]


# Tiny models are dominated by per-op overhead: one intra-op thread is faster and keeps the
# suite's timing stable when the machine is shared.
torch.set_num_threads(1)
