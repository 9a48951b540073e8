"""Shared set-up of the online-RL tests: a tokenizer, the built-in verifiable prompts, a tiny base.

A tiny random model almost never answers a built-in problem, so the tests that need rewards
to vary within a group use `letter_reward` (a `python:` reward) — the share of the letter "e"
in the completion — which a random policy already spreads. Configs are plain dicts validated as
`align.rl_config.RLConfig`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from align.rl_config import RLConfig
from data_pipeline.builtin.verifiable import generate_verifiable_prompts
from test_sft import make_base, make_tokenizer
from utils.config import validate

LETTER_REWARD = {"type": "python", "function": "rl_fixtures:letter_reward", "weight": 1.0}


def letter_reward(prompts, completions, records) -> list[float]:
    """The share of the letter "e" among a completion's characters (0 for an empty one)."""
    return [c.count("e") / len(c) if c else 0.0 for c in completions]


@dataclass
class RLEnv:
    root: Path
    data_dir: Path
    base: Path


def write_prompts(path: Path, n: int = 48, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [r for r in generate_verifiable_prompts(4 * n, seed) if r["task"] not in ("story_name", "story_color")][:n]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def make_rl_env(root: Path) -> RLEnv:
    data = root / "data"
    make_tokenizer(data / "tokenizer")
    write_prompts(data / "prompts" / "rl_prompts.jsonl")
    return RLEnv(root, data, make_base(root / "base", data / "tokenizer", max_seq_len=128))


def rl_dict(env: RLEnv, runs: Path, run_name: str, **sections: dict) -> dict:
    cfg: dict[str, Any] = {
        "stage": "rl",
        "rl": {"algorithm": "grpo", "val_prompts": 8, "prompts_per_step": 4, "group_size": 4,
               "sampling": {"max_new_tokens": 12}, "rewards": [LETTER_REWARD]},
        "data": {"data_dir": str(env.data_dir)},
        "training": {"batch_size": 8, "max_steps": 4, "learning_rate": 2e-3, "warmup_steps": 0, "weight_decay": 0.0,
                     "lr_schedule": "constant", "device": "cpu", "eval_interval": 4},
        "logging": {"runs_dir": str(runs), "run_name": run_name, "log_interval": 1},
        "checkpointing": {"init_from": str(env.base), "save_interval": 2, "keep_last": 4},
    }
    for name, values in sections.items():
        cfg.setdefault(name, {}).update(values)
    return cfg


def rl_config(env: RLEnv, runs: Path, run_name: str, **sections: dict) -> RLConfig:
    return validate(rl_dict(env, runs, run_name, **sections), RLConfig)
