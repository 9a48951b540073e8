"""Learning-rate schedules as one pure function: step → multiplier of each group's base LR.

- ``cosine``: linear warmup, then a half cosine from 1 down to ``min_lr_ratio``
  (Loshchilov & Hutter 2017, SGDR; the usual GPT-3 / Llama recipe).
- ``wsd``: warmup–stable–decay (Hu et al. 2024, MiniCPM): linear warmup, hold at 1, then
  decay to ``min_lr_ratio`` over the last ``decay_fraction`` of the steps, either linearly
  or with the "1−sqrt" shape that Hägele et al. 2024 found to work better.
- ``constant``: linear warmup, then 1.

Conventions (``step`` is the 0-based index of the optimizer update about to happen):
warmup update k = step + 1 of W = ``warmup_steps`` gets k / W, so the first update already
moves (1/W) and update W is at full LR. The decay phases measure progress the same way
(updates done / updates in the phase), so the last update, ``step = max_steps − 1``, runs
exactly at ``min_lr_ratio``; later steps stay there. When warmup and the WSD decay overlap
(very short runs), the smaller of the two multipliers wins.
"""
from __future__ import annotations

import math

from utils.config import TrainingConfig


def warmup_multiplier(step: int, warmup_steps: int) -> float:
    """(step + 1) / warmup_steps during warmup, 1 afterwards (and always 1 without warmup)."""
    if warmup_steps <= 0:
        return 1.0
    return min(1.0, (step + 1) / warmup_steps)


def cosine_multiplier(progress: float, min_ratio: float) -> float:
    """Half cosine from 1 (progress 0) to min_ratio (progress 1)."""
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def wsd_decay_multiplier(progress: float, min_ratio: float, shape: str) -> float:
    """WSD's decay phase: 1 → min_ratio, linear or 1−sqrt in `progress` ∈ [0, 1]."""
    frac = progress if shape == "linear" else math.sqrt(progress)
    return 1.0 - (1.0 - min_ratio) * frac


def lr_multiplier(step: int, tcfg: TrainingConfig) -> float:
    """The factor applied to every group's ``base_lr`` for update number `step` (0-based)."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    warm = warmup_multiplier(step, tcfg.warmup_steps)
    if tcfg.lr_schedule == "constant":
        return warm
    if tcfg.lr_schedule == "cosine":
        if step < tcfg.warmup_steps:
            return warm
        decay_steps = max(1, tcfg.max_steps - tcfg.warmup_steps)
        progress = min(1.0, (step - tcfg.warmup_steps + 1) / decay_steps)
        return cosine_multiplier(progress, tcfg.min_lr_ratio)
    # wsd (the config admits only these three names)
    decay_steps = max(1, round(tcfg.decay_fraction * tcfg.max_steps))
    decay_start = tcfg.max_steps - decay_steps
    progress = min(1.0, max(0.0, (step - decay_start + 1) / decay_steps))
    return min(warm, wsd_decay_multiplier(progress, tcfg.min_lr_ratio, tcfg.wsd_decay_shape))
