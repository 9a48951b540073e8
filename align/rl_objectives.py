"""The loss functions the engine calls for online RL, ``(model, batch) -> LossOutput``.

Each runs the training forward over a rollout micro-batch (`align.rollout` made it), turns the
logits into per-token log-probs of the sampled tokens at the sampling temperature, and applies
the pure losses of `align.rl_losses`:

* `PolicyGradientObjective` — GRPO / GSPO (token- or sequence-level ratio, clip / clip-higher,
  k3 KL to the reference when ``beta > 0``), aggregated as ``rl.loss_aggregation``.
* `PPOObjective` — the clipped surrogate on GAE advantages plus ``vf_coef`` × the clipped
  value loss of the critic; the policy and the critic train together as one `ActorCritic`.
* RFT trains with the SFT loss (`trainer.losses.causal_lm_loss`) on the kept samples.

The engine divides the step's summed loss by the step's summed normaliser (``count_fn``):
completion tokens (token_mean), sequences (sequence_mean) or sequences × max_new_tokens
(dr_grpo). Logged token statistics (``kl``, ``entropy``, ``clip_ratio/*``) are the micro-batch's
token means times its normaliser, so the engine reports their mean over the step.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from align.rl_config import RLSection
from align.rl_losses import aggregate_loss, kl_k3, loss_count, policy_loss, token_entropy, value_loss
from align.rollout import completion_logps
from trainer.losses import Batch, LossOutput, model_aux_loss


class ActorCritic(nn.Module):
    """PPO's policy and value model as one module (one optimizer, one DDP wrapper)."""

    def __init__(self, policy: nn.Module, value: nn.Module) -> None:
        super().__init__()
        self.policy, self.value = policy, value

    def forward(self, tokens: Tensor, keep: Optional[Tensor] = None, positions: Optional[Tensor] = None,
                doc_ids: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        """tokens (B, T) → (policy logits (B, T, V), or (N, V) at ``keep``; values (B, T))."""
        return (self.policy(tokens, keep=keep, positions=positions, doc_ids=doc_ids),
                self.value.token_rewards(tokens, positions, doc_ids))


def _masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


class PolicyGradientObjective:
    """GRPO (DeepSeekMath) and GSPO on group-normalised advantages (see the module docstring)."""

    def __init__(self, rl: RLSection) -> None:
        self.rl = rl
        self.level = "sequence" if rl.algorithm == "gspo" else "token"

    def count(self, batch: Batch) -> int:
        return int(loss_count(batch["mask"], self.rl.loss_aggregation, self.rl.sampling.max_new_tokens))

    def __call__(self, model: nn.Module, batch: Batch) -> LossOutput:
        rl, mask = self.rl, batch["mask"]
        logps, logits, rows = completion_logps(model, batch, rl.sampling.temperature)  # (S, L), (U, V), (N,)
        old = batch.get("old_logps", logps.detach())
        out = policy_loss(logps, old, batch["advantages"], mask, rl.epsilon, rl.epsilon_high, level=self.level,
                          ref_logps=batch.get("ref_logps"), beta=rl.beta)
        loss_sum, count = aggregate_loss(out.per_token, mask, rl.loss_aggregation, rl.sampling.max_new_tokens)
        with torch.no_grad():
            entropy = token_entropy(logits.detach().float()[None] / rl.sampling.temperature)[0][rows].sum()
            stats = {"entropy": entropy / mask.sum().clamp(min=1),
                     "clip_ratio/low": _masked_mean(out.clip_low.float(), mask),
                     "clip_ratio/high": _masked_mean(out.clip_high.float(), mask),
                     "clip_ratio/region": _masked_mean((out.clip_low | out.clip_high).float(), mask)}
            if out.kl is not None:
                stats["kl"] = _masked_mean(out.kl, mask)
            elif "ref_logps" in batch:
                stats["kl"] = _masked_mean(kl_k3(logps.detach(), batch["ref_logps"]), mask)
        sums = {k: v * count for k, v in stats.items()}
        return LossOutput(loss_sum=loss_sum, n_tokens=int(count), sums=sums, aux_loss=model_aux_loss(model))


class PPOObjective:
    """InstructGPT-style PPO: clipped surrogate on per-token GAE advantages + clipped value loss."""

    def __init__(self, rl: RLSection) -> None:
        self.rl = rl

    @staticmethod
    def count(batch: Batch) -> int:
        return int(batch["mask"].sum())

    def __call__(self, model: nn.Module, batch: Batch) -> LossOutput:
        rl, mask = self.rl, batch["mask"]
        critic: dict[str, Tensor] = {}

        def both(ids: Tensor, keep: Tensor, **packed: Tensor) -> Tensor:  # one call of the ActorCritic (DDP's forward)
            logits, critic["values"] = model(ids, keep=keep, **packed)
            return logits

        logps, logits, rows = completion_logps(both, batch, rl.sampling.temperature)  # (S, L), (U, V), (N,)
        # (S, L) the value of the state before each generated token: at the position predicting it
        v = critic["values"].float().flatten()[batch["src"]]
        kl_loss = rl.kl_penalty == "loss" and "ref_logps" in batch
        out = policy_loss(logps, batch["old_logps"], batch["advantages"], mask, rl.epsilon, None, level="token",
                          ref_logps=batch.get("ref_logps") if kl_loss else None,
                          beta=rl.kl_coef if kl_loss else 0.0)
        v_loss, v_clipped = value_loss(v, batch["old_values"], batch["returns"], mask, rl.cliprange_value)
        pg_sum = (out.per_token * mask).sum()
        vf_sum = (v_loss * mask).sum()
        count = mask.sum()
        with torch.no_grad():
            entropy = token_entropy(logits.detach().float()[None] / rl.sampling.temperature)[0][rows]
            stats = {"pg_loss": pg_sum.detach(), "vf_loss": vf_sum.detach(),
                     "entropy": entropy.sum(),
                     "clip_ratio/region": ((out.clip_low | out.clip_high).float() * mask).sum(),
                     "vf_clip_frac": (v_clipped.float() * mask).sum(),
                     "value_mean": (v.detach() * mask).sum()}
            if "ref_logps" in batch:
                stats["kl"] = (kl_k3(logps.detach(), batch["ref_logps"]) * mask).sum()
        return LossOutput(loss_sum=pg_sum + rl.vf_coef * vf_sum, n_tokens=int(count), sums=stats,
                          aux_loss=model_aux_loss(model))


def reference_logps_fn(model: nn.Module, temperature: float, amp, adapters_off: bool = False):
    """``micro-batches -> (S, L)`` reference log-probs: a frozen copy, or the LoRA policy with its
    adapters switched off (`model.lora.disable_adapters`, no second copy)."""
    from align.rollout import batched_logps
    from model.lora import disable_adapters

    def reference(micros: list[Batch]) -> Tensor:
        if adapters_off:
            with disable_adapters(model):
                return batched_logps(model, micros, temperature, amp)
        return batched_logps(model, micros, temperature, amp)

    return reference
