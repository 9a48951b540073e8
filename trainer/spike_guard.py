"""Loss-spike guard: skip bad updates, roll back after a run of them.

Large runs diverge through rare loss spikes and non-finite values. The remedy used for PaLM
(Chowdhery et al. 2022, §5.1: "restart from a checkpoint ~100 steps before the spike and
skip the data batches seen around it") and OPT-175B (Zhang et al. 2022: roll back and
lower the learning rate) is automated here as pure decision logic with no torch in it:

* a step is *bad* when its loss or gradient norm is not finite, or when its loss exceeds
  ``mean + threshold * std`` of the last ``window`` good losses (judged once at least
  `min_history` good losses are known; an infinite threshold judges finiteness only);
* a bad step is skipped (no optimizer update) and counted;
* after ``max_consecutive`` bad steps in a row the guard asks for a rollback: the engine
  restores the newest checkpoint saved before the streak began, keeps the data position
  (the offending batches are skipped, as in PaLM) and multiplies the learning rate by
  ``lr_factor`` (`lr_scale` accumulates over rollbacks).

Every decision depends only on globally reduced numbers, so all ranks decide alike.
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Any, Literal, Optional

Action = Literal["step", "skip", "rollback"]


@dataclass(frozen=True)
class Decision:
    action: Action
    reason: str = ""  # why a step was judged bad ("" for a good step)


def spike_limit(history: list[float], threshold: float) -> float:
    """``mean + threshold * std`` (population std) of the recent good losses."""
    n = len(history)
    mean = sum(history) / n
    std = math.sqrt(sum((x - mean) ** 2 for x in history) / n)
    return mean + threshold * std


class SpikeGuard:
    """Judges each step from its (global) loss and gradient norm; see the module docstring."""

    def __init__(self, threshold: float = 3.0, window: int = 50, max_consecutive: int = 5,
                 lr_factor: float = 0.5, enabled: bool = True, min_history: Optional[int] = None) -> None:
        self.threshold = threshold
        self.max_consecutive = max_consecutive
        self.lr_factor = lr_factor
        self.enabled = enabled
        self.min_history = min(window, 10) if min_history is None else min_history
        self.history: deque[float] = deque(maxlen=window)  # recent good losses
        self.consecutive = 0        # bad steps in the current streak
        self.streak_start: Optional[int] = None  # step index of the streak's first bad step
        self.skipped_total = 0
        self.rollbacks = 0
        self.lr_scale = 1.0         # product of lr_factor over all rollbacks

    def judge(self, loss: float, grad_norm: float) -> str:
        """Why this step is bad, or "" when it is good. Does not change any state."""
        if not math.isfinite(loss):
            return f"non-finite loss ({loss})"
        if not math.isfinite(grad_norm):
            return f"non-finite gradient norm ({grad_norm})"
        if math.isfinite(self.threshold) and len(self.history) >= self.min_history:
            limit = spike_limit(list(self.history), self.threshold)
            if loss > limit:
                return f"loss spike ({loss:.4f} > {limit:.4f} = mean + {self.threshold:g} std of the last {len(self.history)})"
        return ""

    def check(self, step: int, loss: float, grad_norm: float) -> Decision:
        """Decide what to do with update `step` (0-based) and record the outcome."""
        if not self.enabled:
            return Decision("step")
        reason = self.judge(loss, grad_norm)
        if not reason:
            self.history.append(loss)
            self.consecutive = 0
            self.streak_start = None
            return Decision("step")
        self.skipped_total += 1
        if self.consecutive == 0:
            self.streak_start = step
        self.consecutive += 1
        if self.consecutive >= self.max_consecutive:
            return Decision("rollback", f"{reason}; {self.consecutive} bad steps in a row")
        return Decision("skip", reason)

    def on_rollback(self) -> None:
        """The engine rolled back: lower the LR scale and start a fresh streak."""
        self.rollbacks += 1
        self.lr_scale *= self.lr_factor
        self.consecutive = 0
        self.streak_start = None

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        return {
            "history": list(self.history), "consecutive": self.consecutive, "streak_start": self.streak_start,
            "skipped_total": self.skipped_total, "rollbacks": self.rollbacks, "lr_scale": self.lr_scale,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history.clear()
        self.history.extend(float(x) for x in state["history"])
        self.consecutive = int(state["consecutive"])
        self.streak_start = None if state["streak_start"] is None else int(state["streak_start"])
        self.skipped_total = int(state["skipped_total"])
        self.rollbacks = int(state["rollbacks"])
        self.lr_scale = float(state["lr_scale"])
