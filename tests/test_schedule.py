"""trainer.schedule.lr_multiplier against values computed by hand."""
from __future__ import annotations

import math

import pytest

from trainer.schedule import lr_multiplier
from utils.config import TrainingConfig


def _cfg(**kw) -> TrainingConfig:
    return TrainingConfig(**kw)


def test_cosine_by_hand():
    c = _cfg(lr_schedule="cosine", warmup_steps=10, max_steps=110, min_lr_ratio=0.1)
    assert lr_multiplier(0, c) == pytest.approx(0.1)  # warmup update 1 of 10
    assert lr_multiplier(4, c) == pytest.approx(0.5)
    assert lr_multiplier(9, c) == pytest.approx(1.0)  # last warmup update: full LR
    # after warmup: progress = (step − 10 + 1) / 100
    assert lr_multiplier(10, c) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.01)))
    assert lr_multiplier(34, c) == pytest.approx(0.1 + 0.45 * (1 + math.sqrt(0.5)))  # progress 1/4 → 0.868198
    assert lr_multiplier(34, c) == pytest.approx(0.868198, abs=1e-6)
    assert lr_multiplier(59, c) == pytest.approx(0.55)  # halfway: (1 + 0.1) / 2
    assert lr_multiplier(109, c) == pytest.approx(0.1)  # last update runs at min_lr_ratio
    assert lr_multiplier(500, c) == pytest.approx(0.1)  # and stays there


def test_wsd_linear_and_one_minus_sqrt_by_hand():
    # 100 steps, decay over the last 20 (steps 80..99), warmup 10
    lin = _cfg(lr_schedule="wsd", warmup_steps=10, max_steps=100, decay_fraction=0.2, min_lr_ratio=0.1)
    assert lr_multiplier(0, lin) == pytest.approx(0.1)
    assert lr_multiplier(9, lin) == 1.0
    assert lr_multiplier(50, lin) == 1.0
    assert lr_multiplier(79, lin) == 1.0  # last stable step
    assert lr_multiplier(80, lin) == pytest.approx(1 - 0.9 * 1 / 20)  # 0.955
    assert lr_multiplier(89, lin) == pytest.approx(0.55)  # progress 10/20
    assert lr_multiplier(99, lin) == pytest.approx(0.1)
    sq = _cfg(lr_schedule="wsd", warmup_steps=10, max_steps=100, decay_fraction=0.2, min_lr_ratio=0.1,
              wsd_decay_shape="1-sqrt")
    assert lr_multiplier(79, sq) == 1.0
    assert lr_multiplier(84, sq) == pytest.approx(1 - 0.9 * 0.5)  # progress 5/20 → sqrt = 0.5 → 0.55
    assert lr_multiplier(89, sq) == pytest.approx(0.363604, abs=1e-6)  # 1 − 0.9·sqrt(0.5)
    assert lr_multiplier(99, sq) == pytest.approx(0.1)


def test_constant_and_no_warmup():
    c = _cfg(lr_schedule="constant", warmup_steps=4, max_steps=10)
    assert [lr_multiplier(s, c) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert lr_multiplier(10_000, c) == 1.0
    assert lr_multiplier(0, _cfg(lr_schedule="constant", warmup_steps=0)) == 1.0
    cos = _cfg(lr_schedule="cosine", warmup_steps=0, max_steps=4, min_lr_ratio=0.0)
    # progress 1/4, 2/4, 3/4, 4/4 → (1 + cos(πp)) / 2
    assert [lr_multiplier(s, cos) for s in range(4)] == pytest.approx([0.853553, 0.5, 0.146447, 0.0], abs=1e-6)


def test_short_runs_warmup_longer_than_training():
    # warmup 100 > max_steps 20: still ramping at the end (cosine) / min(warmup, decay) (wsd)
    c = _cfg(lr_schedule="cosine", warmup_steps=100, max_steps=20)
    assert lr_multiplier(19, c) == pytest.approx(0.2)
    w = _cfg(lr_schedule="wsd", warmup_steps=100, max_steps=20, decay_fraction=0.5, min_lr_ratio=0.0)
    assert lr_multiplier(5, w) == pytest.approx(0.06)  # warmup 6/100 < decay 1
    assert lr_multiplier(19, w) == 0.0  # decay end wins
    with pytest.raises(ValueError):
        lr_multiplier(-1, c)


def test_monotone_after_warmup():
    for sched in ("cosine", "wsd"):
        c = _cfg(lr_schedule=sched, warmup_steps=5, max_steps=50, min_lr_ratio=0.05)
        vals = [lr_multiplier(s, c) for s in range(5, 60)]
        assert all(a >= b for a, b in zip(vals, vals[1:])), sched
        assert min(vals) == pytest.approx(0.05)
