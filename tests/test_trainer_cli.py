"""The pretraining stage: `pretrain/train.py` CLI errors, --print_config, and a run whose loss falls."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

import pretrain.train as pretrain
from conftest import assert_user_error, run_script
from model.presets import PRESETS
from trainer_fixtures import make_pretrain_data, make_tokenizer, tiny_config, one_thread  # noqa: F401 (autouse fixture)
from utils.checkpoint import load_checkpoint
from utils.errors import UserError

SCRIPT = "pretrain/train.py"
TINY = "configs/pretrain/tiny.yaml"


def test_unknown_key_exits_2_with_one_line() -> None:
    line = assert_user_error(run_script([SCRIPT, "--config_path", TINY, "--set", "training.learning_rat=1e-3"]))
    assert "training.learning_rat" in line and "learning_rate" in line


def test_print_config_shows_overrides_and_flags() -> None:
    proc = run_script([SCRIPT, "--config_path", TINY, "--print_config", "--compile", "--device", "cpu",
                       "--set", "training.max_steps=7"])
    assert proc.returncode == 0, proc.stderr
    cfg = yaml.safe_load(proc.stdout)
    assert cfg["training"]["max_steps"] == 7 and cfg["training"]["compile"] is True
    assert cfg["training"]["device"] == "cpu" and cfg["logging"]["run_name"] == "tiny"


def test_missing_data_names_the_command_to_run(tmp_path: Path) -> None:
    line = assert_user_error(run_script([SCRIPT, "--config_path", TINY, "--device", "cpu",
                                         "--set", f"logging.runs_dir={tmp_path / 'runs'}",
                                         "--set", f"data.data_dir={tmp_path / 'none'}"]))
    assert "train_tokenizer.py" in line
    assert not (tmp_path / "runs").exists()  # checked before the run directory is made
    make_tokenizer(tmp_path / "data" / "tokenizer")
    cfg = tiny_config(tmp_path / "data", tmp_path / "runs")
    with pytest.raises(UserError, match="build_pretrain_bins.py"):
        pretrain.train(cfg)


def test_loss_falls_on_pattern_data(tmp_path: Path) -> None:
    data = make_pretrain_data(tmp_path)
    cfg = tiny_config(data, tmp_path / "runs", training={"max_steps": 30, "eval_interval": 15},
                      checkpointing={"save_interval": 30}, logging={"sample_interval": 30, "sample_tokens": 8})
    summary = pretrain.train(cfg)
    run = tmp_path / "runs/pretrain/test"
    records = [yaml.safe_load(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    vals = [r["val_loss"] for r in records if "val_loss" in r]
    assert len(losses) == 30 and len(vals) == 2
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5
    assert vals[-1] < 3.6 < 4.16  # ln(64) ≈ 4.16: better than uniform guessing
    assert summary["final_checkpoint"] == run / "checkpoints/final"
    samples = [r["sample"] for r in records if "sample" in r]
    assert len(samples) == 1 and len(samples[0].split()) > 1
    first = records[0]
    assert {"lr", "grad_norm", "tokens_per_s", "mfu", "peak_mem_gb", "tokens_seen"} <= set(first)
    assert (run / "train.log").read_text().count("val loss") == 2
    assert (run / "loss.png").stat().st_size > 0


def test_bad_compile_backend_is_a_user_error(tmp_path: Path) -> None:
    data = make_pretrain_data(tmp_path, n_train_docs=50, n_val_docs=20)
    cfg = tiny_config(data, tmp_path / "runs", training={"compile": True, "compile_backend": "nonesuch"})
    with pytest.raises(UserError, match="not a torch.compile backend"):
        pretrain.train(cfg)


def test_moe_mtp_model_trains_and_balances(tmp_path: Path) -> None:
    """DeepSeek-V3-style model: MTP and balance losses are logged, the expert biases move."""
    data = make_pretrain_data(tmp_path, n_train_docs=100, n_val_docs=20)
    model = dict(PRESETS["tiny-deepseek_v3"], vocab_size=64, max_seq_len=32)
    model["moe"] = dict(model["moe"], seq_aux_loss_alpha=0.01)
    cfg = tiny_config(data, tmp_path / "runs", model=model, training={"max_steps": 4},
                      logging={"log_interval": 2})
    pretrain.train(cfg)
    run = tmp_path / "runs/pretrain/test"
    records = [yaml.safe_load(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in records if "loss" in r]
    assert all({"ce", "mtp/1", "aux", "moe/cv", "moe/max_min_ratio"} <= set(r) for r in logged)
    depths = [logged[-1][k] for k in logged[-1] if k.startswith("mtp/")]  # each over its own targets
    assert logged[-1]["loss"] == pytest.approx(logged[-1]["ce"] + 0.3 * sum(depths) / len(depths), rel=1e-5)
    weights = load_checkpoint(run / "checkpoints/final").state_dict
    biases = [v for k, v in weights.items() if k.endswith("e_score_correction_bias")]
    assert biases and all(b.abs().sum() > 0 for b in biases)


def test_missing_tensorboard_is_one_clear_error(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if not installed
    data = make_pretrain_data(tmp_path, n_train_docs=50, n_val_docs=20)
    cfg = tiny_config(data, tmp_path / "runs", logging={"tensorboard": True})
    with pytest.raises(UserError, match="pip install tensorboard"):
        pretrain.train(cfg)
