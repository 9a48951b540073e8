"""The math of online RL for language models, as small pure functions over per-token log-probs.

Every function works on per-token tensors of the sampled completions, shape (B, T), with a
``mask`` (B, T) that is 1 on completion tokens and 0 on padding (and on anything else that must
not be trained on); sequence-level inputs are (B,). How losses are summed over micro-batches and
processes is the training engine's job: `aggregate_loss` returns a sum and its normaliser so
they can be summed separately. The formulas follow the papers and TRL's trainers (trl 1.16
``GRPOTrainer``; the PPO parts follow TRL's former ``PPOTrainer``), which the tests use as
references:

* GRPO (DeepSeekMath, Shao et al. 2024): `group_advantages`: a prompt's G sampled completions
  form a group, the advantage of each is its reward minus the group mean, divided by the group
  std (``scale_rewards="group"``) or the batch std (``"batch"``); `policy_loss`: PPO's clipped
  surrogate per token with those advantages, plus β·KL to a reference (the k3 estimator,
  `kl_k3`, Schulman 2020 "Approximating KL divergence").
* DAPO (Yu et al. 2025): clip-higher (``epsilon_high`` > ``epsilon``), the token-level loss
  (``aggregate_loss(how="token_mean")``) and dynamic sampling (drop groups whose rewards all
  agree: `zero_variance_groups`).
* Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-like training"): no std division
  (``scale_rewards="none"``) and a constant normaliser B·L_max (``how="dr_grpo"``).
* GSPO (Zheng et al. 2025): the importance ratio of a whole sequence, length-normalised
  (`gspo_log_ratio`, ``policy_loss(level="sequence")``).
* PPO (Schulman et al. 2017) with a value model: `value_loss` (the clipped value loss of the
  PPO2 baselines), `gae` (Generalised Advantage Estimation, Schulman et al. 2016), `whiten`;
  the per-token rewards of RLHF (InstructGPT, Ouyang et al. 2022): `ppo_token_rewards`, a KL
  penalty on every token and the reward model's score on the last one.
* `token_entropy`: entropy of the policy's next-token distribution, for logging or a bonus.

Returned per-token tensors are 0 (or False) on padding, so callers may sum them directly.
"""
from __future__ import annotations

from typing import Literal, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

ScaleRewards = Literal["group", "batch", "none"]
LossAggregation = Literal["token_mean", "sequence_mean", "dr_grpo"]
SCALE_REWARDS: tuple[str, ...] = ScaleRewards.__args__  # type: ignore[attr-defined]
LOSS_AGGREGATIONS: tuple[str, ...] = LossAggregation.__args__  # type: ignore[attr-defined]


class PolicyLossOutput(NamedTuple):
    """Per-token policy loss and what is logged about it; all (B, T), 0 / False on padding."""

    per_token: Tensor       # (B, T) loss per token, with the β·KL term when β != 0
    kl: Optional[Tensor]    # (B, T) k3 KL to the reference (detached), None without ref_logps
    clip_low: Tensor        # (B, T) bool: ratio < 1 - ε_low and A < 0 (the clip is active)
    clip_high: Tensor       # (B, T) bool: ratio > 1 + ε_high and A > 0
    ratio: Tensor           # (B, T) importance ratio π/π_old (detached; one value per row at sequence level)


def _bool(mask: Tensor) -> Tensor:
    return mask if mask.dtype == torch.bool else mask != 0


def _masked(x: Tensor, mask: Tensor) -> Tensor:
    """x with padding set to exactly 0 (where, not a product: inf or nan on padding stay out)."""
    return torch.where(_bool(mask), x, torch.zeros((), dtype=x.dtype, device=x.device))


# ------------------------------------------------------------------------------------------------ KL
def kl_k1(logps: Tensor, ref_logps: Tensor) -> Tensor:
    """k1 estimator of KL(π || π_ref) per token: ``log π - log π_ref`` (unbiased, can be < 0)."""
    return logps - ref_logps


def kl_k3(logps: Tensor, ref_logps: Tensor) -> Tensor:
    """k3 estimator of KL(π || π_ref) per token: ``exp(r) - r - 1`` with r = log π_ref - log π
    (unbiased, always ≥ 0; TRL GRPO's ``per_token_kl``)."""
    r = ref_logps - logps
    return torch.exp(r) - r - 1


# ------------------------------------------------------------------------------- group advantages
def _nanstd(x: Tensor, dim: Optional[int] = None) -> Tensor:
    """Unbiased std ignoring NaNs (TRL's ``nanstd``): NaN where fewer than 2 values."""
    mean = torch.nanmean(x, dim=dim, keepdim=True)
    var = torch.nanmean((x - mean) ** 2, dim=dim, keepdim=True)
    count = (~torch.isnan(x)).sum(dim=dim, keepdim=True).to(x.dtype)
    var = var * torch.where(count > 1, count / (count - 1), torch.full_like(var, float("nan")))
    std = var.sqrt()
    return std.squeeze(dim) if dim is not None else std.reshape(())


def _groups(rewards: Tensor, group_size: int) -> Tensor:
    if rewards.dim() != 1 or group_size < 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards must be (N,) with N a multiple of group_size; got {tuple(rewards.shape)} "
                         f"and group_size {group_size}")
    return rewards.view(-1, group_size)  # (num_groups, G)


def group_std(rewards: Tensor, group_size: int) -> Tensor:
    """Unbiased std of each group's rewards, repeated over its members (N,). 0 when group_size
    is 1 (as TRL); NaN rewards (unscorable completions) are left out."""
    grouped = _groups(rewards, group_size)
    if group_size == 1:
        return torch.zeros_like(rewards)
    return _nanstd(grouped, dim=1).repeat_interleave(group_size)


def zero_variance_groups(rewards: Tensor, group_size: int) -> Tensor:
    """(num_groups,) bool: groups whose rewards all agree (std ≈ 0, TRL's ``is_std_zero``); their
    advantages are all 0, so they carry no gradient (DAPO's dynamic sampling drops them)."""
    std = group_std(rewards, group_size).view(-1, group_size)[:, 0]
    return torch.isclose(std, torch.zeros_like(std))


def group_advantages(rewards: Tensor, group_size: int, scale_rewards: ScaleRewards,
                     batch_std: Optional[Tensor] = None, eps: float = 1e-4) -> Tensor:
    """GRPO advantages (N,) of rewards (N,) laid out as consecutive groups of ``group_size``
    (rows g·G … g·G+G-1 are one prompt's completions).

      A_i = r_i - mean(group(i))                 then
      "group": A_i / (std(group(i)) + eps)       (unbiased std; GRPO)
      "batch": A_i / (std(all rewards) + eps)    (``batch_std`` if given: the std across processes)
      "none":  A_i                               (Dr. GRPO)

    As TRL 1.16 (``sum_then_normalize``): NaN rewards are left out of means and stds and get
    advantage 0; a batch of one reward has std 0.
    """
    grouped = _groups(rewards, group_size)
    mean = torch.nanmean(grouped, dim=1).repeat_interleave(group_size)  # (N,)
    advantages = rewards - mean
    if scale_rewards == "group":
        advantages = advantages / (group_std(rewards, group_size) + eps)
    elif scale_rewards == "batch":
        if batch_std is None:
            batch_std = _nanstd(rewards) if rewards.numel() > 1 else torch.zeros((), dtype=rewards.dtype,
                                                                                  device=rewards.device)
        advantages = advantages / (batch_std + eps)
    elif scale_rewards != "none":
        raise ValueError(f"unknown scale_rewards {scale_rewards!r}; one of {SCALE_REWARDS}")
    return torch.nan_to_num(advantages, nan=0.0)


# ----------------------------------------------------------------------------------- policy loss
def gspo_log_ratio(logps: Tensor, old_logps: Tensor, mask: Tensor) -> Tensor:
    """GSPO's sequence log importance ratio (B, 1): ``Σ_t m_t (log π - log π_old) / max(Σ_t m_t, 1)``."""
    m = _bool(mask)
    total = _masked(logps - old_logps, m).sum(dim=-1, keepdim=True)  # (B, 1)
    return total / m.sum(dim=-1, keepdim=True).clamp(min=1).to(total.dtype)


def policy_loss(logps: Tensor, old_logps: Tensor, advantages: Tensor, mask: Tensor, epsilon: float,
                epsilon_high: Optional[float] = None, level: Literal["token", "sequence"] = "token",
                ref_logps: Optional[Tensor] = None, beta: float = 0.0,
                kl_importance_correction: bool = False) -> PolicyLossOutput:
    """PPO's clipped surrogate per token (GRPO / DAPO / GSPO, as TRL's ``GRPOTrainer``).

    logps, old_logps, ref_logps (B, T) log-probs of the sampled tokens under the policy, the
    policy that sampled them and the reference; advantages (B,); mask (B, T).

      ρ = exp(log π - log π_old)                        (level "token": per token;
                                                         "sequence": exp(`gspo_log_ratio`) per row)
      loss_t = -min(ρ A, clip(ρ, 1 - ε, 1 + ε_high) A) [+ β k3(π, π_ref)_t [· ρ]]

    ε_high defaults to ε (DAPO's clip-higher sets it larger). ``ref_logps`` is required when
    β != 0; when given at β = 0 the KL is still returned (for logging). advantages may also be
    per token (B, T) (PPO with GAE).

    ``kl_importance_correction`` multiplies the KL term by ρ (with its gradient), which makes
    its gradient the unbiased reverse-KL gradient off-policy (DeepSeek-V3.2); TRL 1.16's
    ``use_bias_correction_kl``, True by default there. The returned ``kl`` is the term as used
    in the loss (so ρ·k3 then), as TRL logs it.
    """
    if beta != 0.0 and ref_logps is None:
        raise ValueError(f"beta = {beta} needs ref_logps (the reference model's log-probs)")
    eps_low, eps_high = epsilon, epsilon if epsilon_high is None else epsilon_high
    m = _bool(mask)
    adv = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages  # (B, 1)
    if level == "token":
        log_ratio = logps - old_logps  # (B, T)
    elif level == "sequence":
        log_ratio = gspo_log_ratio(logps, old_logps, m)  # (B, 1)
    else:
        raise ValueError(f"unknown importance sampling level {level!r}; 'token' or 'sequence'")
    ratio = torch.exp(log_ratio)  # (B, T) or (B, 1)
    clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
    per_token = -torch.min(ratio * adv, clipped * adv).expand_as(logps)  # (B, T)
    kl = None
    if ref_logps is not None:
        kl = kl_k3(logps, ref_logps)  # (B, T)
        if kl_importance_correction:
            kl = kl * ratio  # (B, T)
        if beta != 0.0:
            per_token = per_token + beta * kl
        kl = _masked(kl.detach(), m)
    clip_low = ((ratio < 1 - eps_low) & (adv < 0)).expand_as(m) & m
    clip_high = ((ratio > 1 + eps_high) & (adv > 0)).expand_as(m) & m
    return PolicyLossOutput(_masked(per_token, m), kl, clip_low, clip_high,
                            _masked(ratio.detach().expand_as(logps), m))


def loss_count(mask: Tensor, how: LossAggregation, max_completion_length: int) -> float:
    """The normaliser of `aggregate_loss` from the mask alone (known before any forward pass)."""
    if how == "token_mean":
        return float(_bool(mask).sum().item())
    if how == "sequence_mean":
        return float(mask.shape[0])
    if how == "dr_grpo":
        return float(mask.shape[0] * max_completion_length)
    raise ValueError(f"unknown loss aggregation {how!r}; one of {LOSS_AGGREGATIONS}")


def aggregate_loss(per_token: Tensor, mask: Tensor, how: LossAggregation,
                   max_completion_length: int) -> tuple[Tensor, float]:
    """(loss_sum, normaliser) with loss = loss_sum / normaliser; over micro-batches and processes
    the engine sums both and divides. per_token, mask (B, T); n_i = Σ_t mask.

      token_mean     Σ_it m·ℓ / Σ_it m               (DAPO; TRL "dapo", and "bnpo" per micro-batch)
      sequence_mean  Σ_i (Σ_t m·ℓ / max(n_i, 1)) / B  (GRPO; TRL "grpo")
      dr_grpo        Σ_it m·ℓ / (B · L_max)          (Dr. GRPO; TRL "dr_grpo")
    """
    m = _bool(mask)
    masked = _masked(per_token, m)
    if how == "sequence_mean":
        n = m.sum(dim=-1).clamp(min=1).to(masked.dtype)
        loss_sum = (masked.sum(dim=-1) / n).sum()
    elif how in ("token_mean", "dr_grpo"):
        loss_sum = masked.sum()
    else:
        raise ValueError(f"unknown loss aggregation {how!r}; one of {LOSS_AGGREGATIONS}")
    return loss_sum, loss_count(m, how, max_completion_length)


# ------------------------------------------------------------------------------ PPO with a critic
def ppo_token_rewards(scores: Tensor, kl: Tensor, mask: Tensor, kl_coef: float) -> Tensor:
    """RLHF per-token rewards (B, T) (InstructGPT): ``-kl_coef · kl`` on every completion token,
    plus the sequence score (B,) on each row's last completion token. A row with no completion
    token gets no score. kl (B, T) is any per-token estimate (`kl_k1` as TRL's PPO, or `kl_k3`)."""
    m = _bool(mask)
    t = m.shape[1]
    rewards = _masked(-kl_coef * kl, m)
    last = (t - 1) - m.flip(1).int().argmax(dim=1)  # (B,) index of the last 1 in each row
    has_token = m.any(dim=1)
    bonus = torch.where(has_token, scores.to(rewards.dtype), torch.zeros_like(rewards[:, 0]))
    return rewards + F.one_hot(last, t).to(rewards.dtype) * bonus[:, None]


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Generalised Advantage Estimation (Schulman et al. 2016) over right-padded completions.

    rewards, values, mask (B, T). With V after a row's last token = 0 (the episode ends):
      δ_t = r_t + γ V_{t+1} - V_t,    A_t = δ_t + γ λ A_{t+1}
    Returns (advantages, returns = advantages + values), both (B, T) and 0 on padding.
    """
    m = _bool(mask)
    r, v = _masked(rewards, m), _masked(values, m)
    b, t = r.shape
    next_adv = torch.zeros(b, dtype=r.dtype, device=r.device)
    next_value = torch.zeros(b, dtype=r.dtype, device=r.device)
    out = []
    for i in reversed(range(t)):
        delta = r[:, i] + gamma * next_value - v[:, i]
        next_adv = delta + gamma * lam * next_adv
        next_value = v[:, i]
        out.append(next_adv)
    advantages = _masked(torch.stack(out[::-1], dim=1), m)
    return advantages, _masked(advantages + v, m)


def whiten(x: Tensor, mask: Tensor, shift_mean: bool = True) -> Tensor:
    """``(x - mean) / sqrt(var + 1e-8)`` with mean and unbiased var over the masked entries (TRL's
    ``masked_whiten``); ``shift_mean=False`` adds the mean back (scales only). 0 on padding."""
    m = _bool(mask)
    count = m.sum().to(x.dtype)
    if count < 2:
        raise ValueError("whiten needs at least 2 masked entries for an unbiased variance")
    mean = _masked(x, m).sum() / count
    var = _masked((x - mean) ** 2, m).sum() / (count - 1)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return _masked(out, m)


def value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor,
               clip_range: float) -> tuple[Tensor, Tensor]:
    """PPO2's clipped value loss per token (TRL's PPOTrainer) and where the clipped term wins.

    values (B, T) the critic now, old_values (B, T) at rollout, returns (B, T):
      v_clip = clip(v, v_old - c, v_old + c)
      loss_t = 0.5 · max((v - R)², (v_clip - R)²),   clipped_t = (v_clip - R)² > (v - R)²
    Both (B, T), 0 / False on padding.
    """
    m = _bool(mask)
    clipped_values = torch.clamp(values, old_values - clip_range, old_values + clip_range)
    unclipped_loss = (values - returns) ** 2
    clipped_loss = (clipped_values - returns) ** 2
    per_token = 0.5 * torch.max(unclipped_loss, clipped_loss)
    return _masked(per_token, m), (clipped_loss > unclipped_loss) & m


# ------------------------------------------------------------------------------------------ entropy
def token_entropy(logits: Tensor, chunk_size: int = 8) -> Tensor:
    """Entropy of softmax(logits) per position, (B, T, V) → (B, T): ``-Σ_v p log p`` from
    log_softmax (stable for any logits), ``chunk_size`` rows at a time to bound the copies.
    Half-precision logits are computed (and returned) in fp32, others in their own dtype."""
    out = []
    for chunk in logits.split(chunk_size, dim=0):
        if chunk.dtype in (torch.float16, torch.bfloat16):
            chunk = chunk.float()
        logp = torch.log_softmax(chunk, dim=-1)
        out.append(-(logp.exp() * logp).sum(dim=-1))
    return torch.cat(out, dim=0)
