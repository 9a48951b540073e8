"""The losses of offline preference optimisation, as small pure functions over log-probs.

Every function takes per-sequence quantities (one value per pair or example, shape (B,)) and
returns per-sequence losses; how they are summed and normalised is the training engine's job
(`trainer.losses`). The formulas follow the papers and TRL's trainers, which the tests use
as references:

* `reward_model_loss`: Bradley–Terry pairwise loss of a reward model (InstructGPT, Ouyang et
  al. 2022, eq. 1), ``-log σ(r_c - r_r - margin)``, plus TRL's optional reward centring
  ``c · (r_c + r_r)²`` (Eisenstein et al. 2023).
* `dpo_loss`: DPO (Rafailov et al. 2023) and its variants on the implicit reward
  ``β · (log π(y|x) - log π_ref(y|x))``:
  ``sigmoid`` (DPO; with label smoothing ε the conservative cDPO of Mitchell 2023),
  ``robust`` (Chowdhury et al. 2024, unbiased under label noise ε),
  ``hinge`` (SLiC, Zhao et al. 2023), ``ipo`` (Azar et al. 2023, on length-averaged log-ratios
  as TRL does), ``bco_pair`` (the paired BCO loss of Jung et al. 2024, as in TRL).
* `orpo_odds_ratio`: ORPO (Hong et al. 2024, eqs. 4–7): ``-log σ(log odds_c - log odds_r)`` on
  length-averaged log-probs, odds(y) = p / (1 - p). The NLL term is added by the caller.
* `simpo_loss`: SimPO (Meng et al. 2024, eq. 6): ``-log σ(β (avg log π_c - avg log π_r) - γ)``,
  no reference model.
* `kto_loss`: KTO (Ethayarajh et al. 2024, eq. 7): desirable ``1 - σ(β (r - z0))``, undesirable
  ``1 - σ(β (z0 - r))``, each weighted; ``z0`` = `kto_kl_estimate` from mismatched pairs.

Log-probs are sums over the response tokens only (`sequence_logps`): prompt tokens and
padding never count.
"""
from __future__ import annotations

import math
from typing import Literal, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from data_pipeline.loader import IGNORE_INDEX

DPOLossType = Literal["sigmoid", "ipo", "hinge", "robust", "bco_pair"]
DPO_LOSS_TYPES: tuple[str, ...] = DPOLossType.__args__  # type: ignore[attr-defined]


class PairLosses(NamedTuple):
    """Per-pair losses and the implicit rewards logged as rewards/chosen and rewards/rejected."""

    losses: Tensor            # (B,)
    chosen_rewards: Tensor    # (B,) detached
    rejected_rewards: Tensor  # (B,) detached


def sequence_logps(logits: Tensor, labels: Tensor, ignore_index: int = IGNORE_INDEX) -> tuple[Tensor, Tensor]:
    """Summed log-probs of each row's targets, and how many targets each row has.

    logits (B, T, V), labels (B, T) in the shifted convention (labels[t] follows input t;
    ``ignore_index`` on prompt, padding and the last position) → (logps (B,) fp32, counts (B,)).
    """
    return kept_sequence_logps(logits[labels != ignore_index], labels, ignore_index)


def kept_sequence_logps(logits: Tensor, labels: Tensor, ignore_index: int = IGNORE_INDEX) -> tuple[Tensor, Tensor]:
    """`sequence_logps` when the logits exist only at the target positions.

    logits (N, V) in row-major order of ``keep = labels != ignore_index`` (B, T), as the model's
    ``forward(..., keep=keep)`` returns them → (logps (B,) fp32, counts (B,)).
    """
    keep = labels != ignore_index  # (B, T)
    rows = keep.nonzero()[:, 0]  # (N,) the row of each kept position
    nll = F.cross_entropy(logits.float(), labels[keep], reduction="none")  # (N,)
    logps = torch.zeros(labels.shape[0], dtype=nll.dtype, device=nll.device).index_add(0, rows, -nll)
    return logps, keep.sum(dim=1)


def reward_model_loss(chosen: Tensor, rejected: Tensor, margin: float | Tensor = 0.0,
                      center_coefficient: Optional[float] = None) -> Tensor:
    """Pairwise reward-model loss per pair (B,): ``-log σ(r_c - r_r - margin) [+ c (r_c + r_r)²]``."""
    losses = -F.logsigmoid(chosen - rejected - margin)
    if center_coefficient:
        losses = losses + center_coefficient * (chosen + rejected) ** 2
    return losses


def dpo_loss(chosen_logps: Tensor, rejected_logps: Tensor, ref_chosen_logps: Tensor, ref_rejected_logps: Tensor,
             beta: float, loss_type: DPOLossType = "sigmoid", label_smoothing: float = 0.0,
             chosen_lengths: Optional[Tensor] = None, rejected_lengths: Optional[Tensor] = None) -> PairLosses:
    """DPO-family losses per pair. All inputs (B,): summed response log-probs of the policy and
    the reference. ``ipo`` needs the response lengths (it works on per-token averages).

    With h = (log π_c - log π_ref,c) - (log π_r - log π_ref,r):
      sigmoid  -(1-ε) log σ(βh) - ε log σ(-βh)          (ε = label_smoothing; ε = 0 is plain DPO)
      robust   (-(1-ε) log σ(βh) + ε log σ(-βh)) / (1 - 2ε)
      hinge    max(0, 1 - βh)
      ipo      (h̄ - 1/(2β))², h̄ on length-averaged log-ratios
      bco_pair -log σ(β ρ_c) - log σ(-β ρ_r), ρ = log π - log π_ref per response
    """
    chosen_ratio = chosen_logps - ref_chosen_logps  # (B,)
    rejected_ratio = rejected_logps - ref_rejected_logps
    h = chosen_ratio - rejected_ratio
    eps = label_smoothing
    if loss_type == "sigmoid":
        losses = -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)
    elif loss_type == "robust":
        if not 0.0 <= eps < 0.5:
            raise ValueError(f"robust DPO needs 0 <= label_smoothing < 0.5, got {eps}")
        losses = (-(1 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1 - 2 * eps)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * h)
    elif loss_type == "ipo":
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError("ipo needs chosen_lengths and rejected_lengths (it averages log-ratios per token)")
        h_avg = chosen_ratio / chosen_lengths.clamp(min=1) - rejected_ratio / rejected_lengths.clamp(min=1)
        losses = (h_avg - 1 / (2 * beta)) ** 2
    elif loss_type == "bco_pair":
        losses = -F.logsigmoid(beta * chosen_ratio) - F.logsigmoid(-beta * rejected_ratio)
    else:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; one of {DPO_LOSS_TYPES}")
    return PairLosses(losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach())


def log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x < 0, stable on both sides of -log 2 (Mächler 2012)."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_odds_ratio(chosen_avg_logps: Tensor, rejected_avg_logps: Tensor, beta: float) -> tuple[PairLosses, Tensor]:
    """ORPO's odds-ratio term per pair, ``-β log σ(log odds(y_c) - log odds(y_r))``, on per-token
    average log-probs (B,). Returns the losses with rewards β·avg log π, and the log odds ratio."""
    c, r = chosen_avg_logps.float(), rejected_avg_logps.float()
    log_odds = (c - r) - (log1mexp(c) - log1mexp(r))  # (B,)
    losses = -beta * F.logsigmoid(log_odds)
    return PairLosses(losses, beta * c.detach(), beta * r.detach()), log_odds.detach()


def simpo_loss(chosen_avg_logps: Tensor, rejected_avg_logps: Tensor, beta: float, gamma: float,
               label_smoothing: float = 0.0) -> PairLosses:
    """SimPO per pair: ``-(1-ε) log σ(β Δ - γ) - ε log σ(-(β Δ - γ))``, Δ = difference of the
    per-token average log-probs (B,); rewards β·avg log π."""
    z = beta * (chosen_avg_logps - rejected_avg_logps) - gamma
    losses = -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    return PairLosses(losses, beta * chosen_avg_logps.detach(), beta * rejected_avg_logps.detach())


def kto_kl_estimate(log_ratio_sum: Tensor, count: Tensor | float) -> Tensor:
    """KTO's reference point z0 (§4.1): the mean log-ratio ``log π(y'|x) - log π_ref(y'|x)`` over
    mismatched (prompt, completion) pairs, from its sum and count (so it can be summed over
    ranks first), clamped at 0 and detached → ()."""
    return (log_ratio_sum / count).detach().clamp(min=0)


def kto_loss(logps: Tensor, ref_logps: Tensor, desirable: Tensor, kl: Tensor, beta: float,
             desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> tuple[Tensor, Tensor]:
    """KTO per example. logps, ref_logps (N,) summed response log-probs; desirable (N,) bool;
    kl () the reference point z0. Returns (weighted losses (N,), implicit rewards β·ρ (N,))."""
    ratio = logps - ref_logps
    good = torch.as_tensor(desirable, dtype=torch.bool, device=ratio.device)
    losses = torch.where(good, desirable_weight * (1 - torch.sigmoid(beta * (ratio - kl))),
                         undesirable_weight * (1 - torch.sigmoid(beta * (kl - ratio))))
    return losses, beta * ratio.detach()
