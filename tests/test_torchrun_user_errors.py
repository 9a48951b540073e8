"""A user mistake under torchrun: one line from rank 0, exit 2 on every rank, no hang, and the
launcher's failure summary naming that line as the root cause (`utils.errors`)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure
from trainer_fixtures import make_pretrain_data, one_thread, tiny_config, tiny_config_dict  # noqa: F401 (autouse)
from utils import errors
from utils.paths import REPO_ROOT

TIMEOUT_S = 180  # a hang on a collective would run into gloo's 30-minute timeout


def _torchrun(args: list[str]) -> tuple[subprocess.CompletedProcess, float]:
    """`torchrun --nproc_per_node=2 <args>` on CPU (gloo) from the repo root; (result, seconds)."""
    from test_distributed import _free_port

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONUNBUFFERED": "1"}
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    return proc, time.monotonic() - start


def _assert_reported_once(proc: subprocess.CompletedProcess, seconds: float, contains: str) -> None:
    """One `error:` line (rank 0's), both ranks exit 2, the summary's root cause is that line."""
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    printed = [ln for ln in out.splitlines() if ln.startswith("error:")]
    assert len(printed) == 1 and contains in printed[0], out
    assert "UserError" not in out and "utils/errors.py" not in out, out  # no worker traceback
    assert re.findall(r"^\s*exitcode\s*: (-?\d+)", out, re.M) == ["2", "2"], out  # no rank killed by a signal
    root_cause = out.split("Root Cause")[-1]
    assert f"traceback : {printed[0]}" in root_cause, out
    assert seconds < PEER_WAIT_BOUND_S, f"took {seconds:.0f}s"


# rank 0 waits for the others at most PEER_GRACE_S; startup of two processes on a busy machine
PEER_WAIT_BOUND_S = errors.PEER_GRACE_S + 100


@pytest.mark.slow
def test_bad_config_under_torchrun_is_one_line_and_exit_2() -> None:
    proc, seconds = _torchrun(["pretrain/train.py", "--config_path", "configs/pretrain/tiny.yaml",
                               "--set", "training.learnig_rate=1"])
    _assert_reported_once(proc, seconds, "training.learnig_rate")


@pytest.mark.slow
def test_parallel_degree_not_dividing_the_world_is_one_line_and_exit_2() -> None:
    proc, seconds = _torchrun(["pretrain/train.py", "--config_path", "configs/pretrain/tiny.yaml",
                               "--set", "training.pipeline_parallel=4", "--set", "training.grad_accum_steps=4"])
    _assert_reported_once(proc, seconds, "training.pipeline_parallel=4 does not divide the world size 2")


@pytest.mark.slow
def test_existing_run_dir_under_torchrun_is_one_line_and_exit_2(tmp_path: Path) -> None:
    from pretrain.train import train

    data = make_pretrain_data(tmp_path)
    runs = tmp_path / "runs"
    train(tiny_config(data, runs, run_name="taken", training={"max_steps": 2}, checkpointing={"save_interval": 2}))
    config = tmp_path / "taken.yaml"
    config.write_text(yaml.safe_dump(tiny_config_dict(data, runs, run_name="taken")))
    # the process group is up when the run directory is checked: every rank must still leave
    proc, seconds = _torchrun(["pretrain/train.py", "--config_path", str(config)])
    _assert_reported_once(proc, seconds, "already holds checkpoints")


# ---------------------------------------------------------------- the pieces, in one process
def test_error_file_is_read_by_torchrun_as_the_root_cause(tmp_path: Path) -> None:
    """The record we write is what torch's own `ProcessFailure` / `ChildFailedError` read."""
    line = errors.one_line("unknown key\n training.x")
    path = tmp_path / "error.json"
    path.write_text(json.dumps(errors.error_file_record(line, time.time())))
    failure = ProcessFailure(local_rank=0, pid=123, exitcode=2, error_file=str(path))
    summary = str(ChildFailedError("train.py", {0: failure}))
    assert line == "error: unknown key training.x"
    assert f"traceback : {line}" in summary.split("Root Cause")[-1]


def test_torchrun_rank_reads_the_launcher_environment(monkeypatch) -> None:
    for name in ("TORCHELASTIC_RUN_ID", "RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert errors.torchrun_rank() is None  # plain `python script.py`
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert errors.torchrun_rank() is None  # torchrun with one process behaves as a plain run
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    assert errors.torchrun_rank() == (3, 4)


def test_single_process_failure_is_unchanged(monkeypatch, capsys) -> None:
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    with pytest.raises(SystemExit) as exc:
        errors.cli_main(lambda: (_ for _ in ()).throw(errors.UserError("bad\nthing")))
    assert exc.value.code == 2
    assert capsys.readouterr().err == "error: bad thing\n"
