"""benchmarks/muon_vs_adamw.py: choosing the best run never crowns a diverged one (issue 14, defect 8)."""
from __future__ import annotations

import math

import pytest

from benchmarks.muon_vs_adamw import best_lr, diverged, final_losses, steps_to_reach


def _run(final: float, diverged_at=None) -> dict:
    return {"curve": [(0, 8.0), (20, final)], "final_val_loss": final, "diverged_at": diverged_at}


def test_a_run_that_went_non_finite_is_never_the_best() -> None:
    # lr 1e-2 blew up at step 37; its last (finite) validation loss, from step 20, is the lowest
    runs = {1e-3: _run(4.0), 3e-3: _run(3.5), 1e-2: _run(3.0, diverged_at=37)}
    assert diverged(runs[1e-2]) and not diverged(runs[3e-3])
    assert best_lr(runs, "adamw") == 3e-3
    assert final_losses({str(k): v for k, v in runs.items()}) == {"0.001": 4.0, "0.003": 3.5, "0.01": None}


def test_non_finite_validation_loss_is_diverged_and_all_diverged_is_an_error() -> None:
    assert diverged(_run(math.nan)) and diverged(_run(math.inf))
    with pytest.raises(RuntimeError, match="every muon run diverged"):
        best_lr({0.01: _run(math.nan), 0.02: _run(2.0, diverged_at=5)}, "muon")


def test_steps_to_reach_interpolates() -> None:
    assert steps_to_reach([(0, 8.0), (10, 6.0), (20, 4.0)], 5.0) == pytest.approx(15.0)
    assert steps_to_reach([(0, 8.0), (10, 6.0)], 5.0) is None
