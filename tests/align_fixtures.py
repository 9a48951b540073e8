"""Shared set-up of the alignment tests: a tokenizer, the built-in preference bins, a tiny base.

The base is a tiny random model saved as our checkpoint (with the tokenizer and its chat
template), like the SFT tests' (`tests/test_sft.py`); configs are plain dicts validated as
`align.config.AlignConfig`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from align.config import AlignConfig
from data_pipeline.processing import build_preference_bins
from test_sft import make_base, make_tokenizer
from utils.config import validate


@dataclass
class AlignEnv:
    root: Path
    data_dir: Path
    base: Path


def make_align_env(root: Path, num_pairs: int = 240, max_seq_len: int = 192) -> AlignEnv:
    data = root / "data"
    make_tokenizer(data / "tokenizer")
    build_preference_bins.main(["--data_dir", str(data), "--num_pairs", str(num_pairs), "--max_seq_len",
                                str(max_seq_len), "--val_fraction", "0.15"])
    return AlignEnv(root, data, make_base(root / "base", data / "tokenizer", max_seq_len=max_seq_len))


def align_dict(env: AlignEnv, runs: Path, run_name: str, **sections: dict) -> dict:
    cfg: dict[str, Any] = {
        "data": {"data_dir": str(env.data_dir)},
        "training": {"batch_size": 4, "max_steps": 12, "learning_rate": 1e-3, "warmup_steps": 2, "weight_decay": 0.0,
                     "device": "cpu", "eval_interval": 6, "eval_steps": 2},
        "logging": {"runs_dir": str(runs), "run_name": run_name, "log_interval": 1},
        "checkpointing": {"init_from": str(env.base), "save_interval": 6, "keep_last": 3},
    }
    for name, values in sections.items():
        cfg.setdefault(name, {}).update(values)
    return cfg


def align_config(env: AlignEnv, runs: Path, run_name: str, **sections: dict) -> AlignConfig:
    return validate(align_dict(env, runs, run_name, **sections), AlignConfig)


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def train_losses(run: Path) -> list[float]:
    return [r["loss"] for r in metrics(run) if "loss" in r]


def val_records(run: Path) -> list[dict]:
    return [r for r in metrics(run) if "val_loss" in r]
