"""Spike guard: the pure decision logic, and the engine skipping / rolling back (trainer/spike_guard.py)."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from model import build_model
from trainer.losses import causal_lm_loss
from trainer.spike_guard import SpikeGuard, spike_limit
from trainer_fixtures import ListLoader, make_trainer, pattern_docs, tiny_config, one_thread  # noqa: F401 (autouse fixture)
from utils.errors import UserError


def test_spike_limit_by_hand() -> None:
    # mean 2, population std 1 → limit 2 + 3 * 1
    assert spike_limit([1.0, 3.0, 1.0, 3.0], 3.0) == pytest.approx(5.0)


def test_non_finite_loss_or_grad_is_skipped() -> None:
    guard = SpikeGuard(max_consecutive=3)
    assert guard.check(0, 2.0, 1.0).action == "step"
    d = guard.check(1, float("nan"), 1.0)
    assert d.action == "skip" and "non-finite loss" in d.reason
    d = guard.check(2, 2.0, float("inf"))
    assert d.action == "skip" and "gradient" in d.reason
    assert guard.skipped_total == 2 and guard.streak_start == 1
    assert guard.check(3, 2.0, 1.0).action == "step"  # a good step ends the streak
    assert guard.consecutive == 0 and guard.streak_start is None
    assert list(guard.history) == [2.0, 2.0]  # bad steps never enter the history


def test_spike_is_judged_against_recent_history() -> None:
    guard = SpikeGuard(threshold=3.0, window=8, min_history=4)
    for i, loss in enumerate([2.0, 2.2, 1.8, 2.0]):  # mean 2.0, std ≈ 0.141 → limit ≈ 2.42
        assert guard.check(i, loss, 1.0).action == "step"
    assert guard.check(4, 2.4, 1.0).action == "step"  # below the limit
    d = guard.check(5, 9.0, 1.0)
    assert d.action == "skip" and "spike" in d.reason
    # too little history: the same jump passes
    young = SpikeGuard(threshold=3.0, window=8, min_history=4)
    young.check(0, 2.0, 1.0)
    assert young.check(1, 9.0, 1.0).action == "step"
    # an infinite threshold (online RL's surrogate losses) judges finiteness only
    finite_only = SpikeGuard(threshold=math.inf, window=8, min_history=4)
    for i, loss in enumerate([2.0, 2.0, 2.0, 2.0, 900.0]):  # std 0: any finite threshold would skip 900
        assert finite_only.check(i, loss, 1.0).action == "step"
    assert finite_only.check(5, math.nan, 1.0).action == "skip"


def test_rollback_after_k_consecutive_and_lr_scale() -> None:
    guard = SpikeGuard(max_consecutive=3, lr_factor=0.5)
    guard.check(0, 1.0, 1.0)
    actions = [guard.check(s, float("nan"), 1.0).action for s in (1, 2, 3)]
    assert actions == ["skip", "skip", "rollback"] and guard.streak_start == 1
    guard.on_rollback()
    assert guard.lr_scale == 0.5 and guard.rollbacks == 1 and guard.consecutive == 0
    state = guard.state_dict()
    other = SpikeGuard()
    other.load_state_dict(state)
    assert other.state_dict() == state


def test_disabled_guard_always_steps() -> None:
    assert SpikeGuard(enabled=False).check(0, float("nan"), float("nan")).action == "step"


# ---------------------------------------------------------------------------- in the engine
def _setup(tmp_path: Path, bad_steps: set[int], **training):
    cfg = tiny_config(tmp_path, tmp_path / "runs", training={
        "max_steps": 12, "spike_max_consecutive": 3, "spike_window": 4, "lr_schedule": "constant",
        "warmup_steps": 0, **training}, checkpointing={"save_interval": 3, "keep_last": 5})
    docs = torch.tensor([t for d in pattern_docs(50, 0) for t in d])
    rows = docs[: 10 * 4 * 33].view(10 * 4, 33)
    batches = [{"input_ids": r[:, :-1], "labels": r[:, 1:]} for r in rows.split(4)]
    calls = {"n": 0}

    def loss_fn(model, batch):  # poisons the loss of the chosen (1-based) training steps
        out = causal_lm_loss(model, batch)
        calls["n"] += model.training
        if model.training and calls["n"] in bad_steps:
            out.loss_sum = out.loss_sum * float("nan")
        return out

    torch.manual_seed(0)
    model = build_model(cfg.model)
    return make_trainer(cfg, model, ListLoader(batches), tmp_path, loss_fn=loss_fn), model


def test_engine_skips_nan_step_without_touching_weights(tmp_path: Path) -> None:
    trainer, model = _setup(tmp_path, bad_steps={2})
    trainer.train_step()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stats = trainer.train_step()
    assert stats["decision"].action == "skip" and math.isnan(stats["loss"])
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in model.parameters())
    assert trainer.train_step()["decision"].action == "step" and trainer.step == 3


def test_engine_rolls_back_after_k_bad_steps(tmp_path: Path) -> None:
    """Steps 8-10 are bad: after the 3rd the engine reloads step_00000006 (saved before the
    streak began at update 7), halves the LR and still reaches max_steps."""
    trainer, model = _setup(tmp_path, bad_steps={8, 9, 10})
    summary = trainer.fit()
    assert summary["step"] == 12
    assert trainer.guard.rollbacks == 1 and trainer.guard.lr_scale == 0.5
    steps = [s for s, _ in trainer.losses]
    assert steps == list(range(1, 11)) + list(range(7, 13))  # 10 steps, back to 6, on to 12
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(0.5 * 3e-3)


def test_engine_rollback_without_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    trainer, _ = _setup(tmp_path, bad_steps={1, 2, 3})
    with pytest.raises(UserError, match="diverged"):
        trainer.fit()


def test_engine_skips_injected_spike(tmp_path: Path) -> None:
    trainer, _ = _setup(tmp_path, bad_steps=set(), spike_threshold=3.0)
    for _ in range(6):
        assert trainer.train_step()["decision"].action == "step"
    spike = trainer.loss_fn

    def spiking(model, batch):
        out = spike(model, batch)
        out.loss_sum = out.loss_sum * 10  # a 10x loss jump
        return out

    trainer.loss_fn = spiking
    stats = trainer.train_step()
    assert stats["decision"].action == "skip" and "spike" in stats["decision"].reason


def test_fp16_training_survives_a_skip(tmp_path: Path) -> None:
    """fp16 (GradScaler, here its CPU path): a skipped update must end the scaler's step, else
    the next step's unscale_ raises "unscale_() has already been called" (issue 14, defect 1).
    A guard skip leaves the loss scale as it was."""
    trainer, _ = _setup(tmp_path, bad_steps={2}, dtype="fp16")
    assert trainer.scaler.is_enabled()
    assert trainer.train_step()["decision"].action == "step"
    scale = trainer.scaler.get_scale()
    assert trainer.train_step()["decision"].action == "skip"
    assert trainer.scaler.get_scale() == scale
    for _ in range(3):
        assert trainer.train_step()["decision"].action == "step"


def test_fp16_training_survives_a_rollback(tmp_path: Path) -> None:
    trainer, _ = _setup(tmp_path, bad_steps={8, 9, 10}, dtype="fp16")
    summary = trainer.fit()
    assert summary["step"] == 12 and trainer.guard.rollbacks == 1
    assert math.isfinite(summary["loss"])


def test_rollback_discards_checkpoints_of_the_bad_stretch(tmp_path: Path) -> None:
    """Updates 8-10 are bad; step_00000009 is saved inside the streak. The rollback to step 6
    must delete it and supersede step_00000006 with the post-rollback state, so a run killed
    right after the rollback resumes (`--resume auto`) with the lowered LR scale, not from the
    bad stretch (issue 14, defect 13)."""
    from trainer.checkpointing import resolve_resume
    from utils.checkpoint import list_checkpoints, load_checkpoint

    trainer, _ = _setup(tmp_path, bad_steps={8, 9, 10})
    inner = trainer.loss_fn
    seen: list[str] = []

    def killed_after_rollback(model, batch):
        if trainer.guard.rollbacks:
            raise RuntimeError("killed")
        seen.extend(p.name for p in list_checkpoints(trainer.run.checkpoints))
        return inner(model, batch)

    trainer.loss_fn = killed_after_rollback
    with pytest.raises(RuntimeError, match="killed"):
        trainer.fit()
    assert "step_00000009" in seen  # saved during the streak...
    names = [p.name for p in list_checkpoints(trainer.run.checkpoints)]
    assert names == ["step_00000003", "step_00000006"]  # ...and gone after the rollback
    resumed = resolve_resume("auto", trainer.run.checkpoints)
    assert resumed is not None and resumed.name == "step_00000006"
    state = load_checkpoint(resumed, load_training_state=True).training_state
    assert state["step"] == 6
    assert state["spike_guard"]["lr_scale"] == 0.5 and state["spike_guard"]["rollbacks"] == 1
    assert state["ranks"][0]["data"]["pos"] == 10  # past the three bad batches
