"""Checkpoint directory format: round trip, atomic writes, crash mid-save, no pickle."""
from __future__ import annotations

import json
import os
import random
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import run_script
from utils import checkpoint as ck
from utils.device import get_rng_state, seed_everything, set_rng_state
from utils.errors import UserError


def _state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"embed.weight": torch.randn(10, 4, generator=g), "norm.weight": torch.ones(4)}


def test_round_trip_with_training_state(tmp_path: Path) -> None:
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer.json").write_text("{}")
    (tok / "tokenizer_config.json").write_text(json.dumps({"chat_template": "x"}))
    opt_state = {
        "state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(2, 2)}},
        "param_groups": [{"lr": 0.1, "betas": (0.9, 0.95), "params": [0], "foreach": None}],
    }
    seed_everything(5)
    training_state = {"optimizer": opt_state, "step": 7, "rng": get_rng_state(), "loader": {"pos": np.int64(12)}}
    path = ck.save_checkpoint(
        ck.step_dir(tmp_path / "ckpts", 7), _state(), {"dim": 4, "vocab_size": 10},
        tokenizer_dir=tok, training_state=training_state, meta={"step": 7},
    )
    assert path.name == "step_00000007"
    loaded = ck.load_checkpoint(path, load_training_state=True)
    assert loaded.model_config == {"dim": 4, "vocab_size": 10}
    for k, v in _state().items():
        assert torch.equal(loaded.state_dict[k], v)
    assert loaded.tokenizer_dir == path and (path / "tokenizer_config.json").exists()
    ts = loaded.training_state
    assert ts["step"] == 7 and ts["loader"]["pos"] == 12
    assert ts["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.95)
    assert 0 in ts["optimizer"]["state"] and torch.equal(ts["optimizer"]["state"][0]["exp_avg"], opt_state["state"][0]["exp_avg"])
    # RNG state restores exactly
    a = (random.random(), np.random.rand(), torch.rand(1).item())
    set_rng_state(ts["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == a


def test_no_pickle_on_disk(tmp_path: Path) -> None:
    path = ck.save_checkpoint(tmp_path / "c", _state(), {"dim": 4}, training_state={"x": torch.zeros(2)})
    files = sorted(p.name for p in path.rglob("*") if p.is_file())
    assert files == ["config.json", "meta.json", "model.safetensors", "state.json", "tensors.safetensors"]


def test_strips_compile_and_ddp_prefixes_and_tied_weights(tmp_path: Path) -> None:
    w = torch.randn(5, 3)
    sd = {"_orig_mod.embed.weight": w, "module.lm_head.weight": w}  # tied: same storage
    path = ck.save_checkpoint(tmp_path / "c", sd, {})
    loaded = ck.load_checkpoint(path)
    assert set(loaded.state_dict) == {"embed.weight", "lm_head.weight"}
    assert torch.equal(loaded.state_dict["lm_head.weight"], w)


def test_overwrite_is_atomic_and_replaces(tmp_path: Path) -> None:
    target = tmp_path / "best"
    ck.save_checkpoint(target, _state(0), {"v": 1})
    ck.save_checkpoint(target, _state(1), {"v": 2})
    assert ck.load_checkpoint(target).model_config == {"v": 2}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_failed_save_leaves_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "best"
    ck.save_checkpoint(target, _state(0), {"v": 1})

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ck, "save_state_tree", boom)
    with pytest.raises(OSError):
        ck.save_checkpoint(target, _state(1), {"v": 2}, training_state={"a": 1})
    assert ck.load_checkpoint(target).model_config == {"v": 1}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]


CRASHER = textwrap.dedent(
    """
    import os, sys, torch
    from utils import checkpoint as ck
    root = sys.argv[1]
    real = ck.save_state_tree
    def slow_then_die(state, d):
        real(state, d)
        os._exit(9)          # the process dies in the middle of the save, before the rename
    ck.save_state_tree = slow_then_die
    ck.save_checkpoint(ck.step_dir(root, 2), {"w": torch.full((3,), 2.0)}, {"step": 2}, training_state={"step": 2})
    """
)


def test_crash_mid_save_leaves_previous_loadable(tmp_path: Path) -> None:
    root = tmp_path / "ckpts"
    ck.save_checkpoint(ck.step_dir(root, 1), {"w": torch.full((3,), 1.0)}, {"step": 1}, training_state={"step": 1})
    script = tmp_path / "crash.py"
    script.write_text(CRASHER)
    proc = run_script([str(script), str(root)])
    assert proc.returncode == 9
    leftovers = [p.name for p in root.iterdir() if p.name.startswith(".tmp")]
    assert leftovers, "the crash should have happened mid-save"
    latest = ck.latest_checkpoint(root)
    assert latest is not None and latest.name == "step_00000001"
    loaded = ck.load_checkpoint(latest, load_training_state=True)
    assert loaded.training_state == {"step": 1} and torch.equal(loaded.state_dict["w"], torch.ones(3))


def test_crash_between_renames_recovers_backup(tmp_path: Path) -> None:
    target = tmp_path / "best"
    ck.save_checkpoint(target, _state(0), {"v": 1})
    os.rename(target, tmp_path / f".old-best-{os.getpid()}")  # first rename done, second never happened
    assert ck.load_checkpoint(target).model_config == {"v": 1}


def test_latest_and_listing(tmp_path: Path) -> None:
    root = tmp_path / "ckpts"
    for s in (5, 10, 20):
        ck.save_checkpoint(ck.step_dir(root, s), _state(), {}, training_state={"step": s} if s != 20 else None)
    assert [p.name for p in ck.list_checkpoints(root)] == ["step_00000005", "step_00000010", "step_00000020"]
    assert ck.latest_checkpoint(root).name == "step_00000010"
    assert ck.latest_checkpoint(root, resumable=False).name == "step_00000020"
    assert ck.latest_checkpoint(tmp_path / "none") is None


def test_load_errors_are_user_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="checkpoint not found"):
        ck.load_checkpoint(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="not a checkpoint"):
        ck.load_checkpoint(tmp_path / "empty")
    path = ck.save_checkpoint(tmp_path / "c", _state(), {})
    with pytest.raises(UserError, match="no training_state"):
        ck.load_checkpoint(path, load_training_state=True)
