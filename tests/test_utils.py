"""Run directories, device/dtype selection, seeding, error wrapper."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from utils.config import ExperimentConfig, load_config
from utils.device import pick_device, pick_dtype, seed_everything
from utils.errors import UserError, cli_main
from utils.runs import RunDir, setup_logging


def test_run_dir_layout(tmp_path: Path) -> None:
    cfg = ExperimentConfig()
    run = RunDir(tmp_path, "pretrain", "r1").create(cfg)
    assert run.root == tmp_path / "pretrain" / "r1"
    assert run.checkpoints.is_dir() and run.config_path.exists()
    assert load_config(run.config_path).logging.run_name == cfg.logging.run_name
    run.log_metrics({"step": 1, "loss": 2.5})
    run.log_metrics({"step": 2, "loss": 2.0})
    assert [r["loss"] for r in run.read_metrics()] == [2.5, 2.0]
    setup_logging(run.log_path)
    logging.getLogger("t").info("hello-log")
    for h in logging.getLogger().handlers:
        h.flush()
    assert "hello-log" in run.log_path.read_text()


def test_device_and_dtype() -> None:
    assert pick_device("cpu").type == "cpu"
    assert pick_device("auto").type in ("cpu", "cuda", "mps")
    assert pick_dtype("auto", torch.device("cpu")) == torch.float32
    assert pick_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="CUDA is not available"):
            pick_device("cuda")


def test_seeding_is_reproducible() -> None:
    seed_everything(3)
    a = torch.rand(3)
    seed_everything(3)
    assert torch.equal(a, torch.rand(3))


def test_cli_main_exit_code(capsys: pytest.CaptureFixture) -> None:
    def bad() -> None:
        raise UserError("something\nwent wrong")

    with pytest.raises(SystemExit) as e:
        cli_main(bad)
    assert e.value.code == 2
    assert capsys.readouterr().err == "error: something went wrong\n"
