"""Training metrics: the one MFU definition (trainer/metrics.py) and its use everywhere."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import benchmarks.model_speed as model_speed
import benchmarks.train_speed as train_speed
import trainer.metrics as metrics
from model import build_model
from trainer.metrics import measured_peak_flops, peak_flops
from trainer_fixtures import ListLoader, make_trainer, pattern_docs, tiny_config, one_thread  # noqa: F401 (autouse fixture)


def test_peak_is_the_datasheet_for_a_known_gpu_in_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    peak, source = peak_flops(torch.device("cuda"), torch.bfloat16)
    assert peak == 989e12
    assert source == "datasheet: NVIDIA H100 80GB HBM3, dense bf16/fp16, 989 TFLOP/s"


def test_peak_is_measured_elsewhere() -> None:
    peak, source = peak_flops(torch.device("cpu"), torch.float32)
    assert peak == measured_peak_flops("cpu", torch.float32) > 0
    assert source.startswith("measured: best 1024x1024 float32 matmul on cpu, ")


def test_benchmarks_use_the_trainers_definition() -> None:
    """No benchmark keeps a peak of its own (issue 14, defect 9)."""
    assert train_speed.peak_flops is model_speed.peak_flops is metrics.peak_flops
    assert train_speed.mfu is model_speed.mfu is metrics.mfu
    for module in (train_speed, model_speed):
        assert not [name for name in vars(module) if "matmul" in name.lower()], module.__name__


def test_trainer_records_mfu_with_its_peak_source(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path, tmp_path / "runs", training={"max_steps": 2})
    docs = torch.tensor([t for d in pattern_docs(20, 0) for t in d])
    rows = docs[: 2 * 4 * 33].view(2 * 4, 33)
    batches = [{"input_ids": r[:, :-1], "labels": r[:, 1:]} for r in rows.split(4)]
    trainer = make_trainer(cfg, build_model(cfg.model), ListLoader(batches), tmp_path, flops_per_token=1e6)
    trainer.fit()
    records = [json.loads(x) for x in trainer.run.metrics_path.read_text().splitlines()]
    logged = [r for r in records if "mfu" in r]
    assert len(logged) == 2
    peak, source = peak_flops(torch.device("cpu"), torch.float32)
    for r in logged:
        assert r["mfu_peak_source"] == source
        assert r["mfu"] == pytest.approx(1e6 * r["tokens_per_s"] / peak, rel=1e-12)
