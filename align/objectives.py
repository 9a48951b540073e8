"""The loss functions the engine calls, ``(model, batch) -> LossOutput``, for each offline method.

Each one runs the policy (or reward model) forward once over the chosen and rejected rows
together (one concatenated batch, as TRL does), turns logits into per-sequence log-probs over
the response tokens (`response_logps`, the LM head run at those positions only), asks the reference for its log-probs
(`align.reference`), and applies the pure loss of `align.losses`.

What the engine normalises by (``count_fn``) is the number of pairs (KTO: examples) of the
whole optimizer step, so ``loss_sum`` is the sum of per-pair losses and every logged sum
becomes a mean over pairs: ``rewards/chosen``, ``rewards/rejected``, ``rewards/margins``,
``rewards/accuracies``, ``logps/chosen``, ``logps/rejected`` (TRL's names; the reward model
logs ``accuracy`` and ``margin``). Terms that TRL averages over *tokens* of the micro-batch —
the NLL of the chosen responses in RPO (``rpo_alpha``) and ORPO — are that token mean times the
micro-batch's pair count, so a micro-batch's loss equals TRL's exactly.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch import Tensor

from align.config import AlignSection, RewardSection
from align.losses import (PairLosses, dpo_loss, kept_sequence_logps, kto_kl_estimate, kto_loss, orpo_odds_ratio,
                          reward_model_loss, simpo_loss)
from data_pipeline.loader import IGNORE_INDEX
from trainer.distributed import all_reduce_sum
from trainer.losses import Batch, LossOutput, model_aux_loss

Reference = Callable[[Batch], Tensor]  # batch -> (B, k) reference log-probs (see align.reference)


class PairLogps(NamedTuple):
    chosen: Tensor            # (B,) summed response log-probs
    rejected: Tensor          # (B,)
    chosen_tokens: Tensor     # (B,) response lengths
    rejected_tokens: Tensor   # (B,)


def response_logps(model: torch.nn.Module, ids: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """ids, labels (B, T) → summed response log-probs (B,) and response lengths (B,).

    The LM head and its log-softmax run only where a label is set (``keep``): prompt and
    padding positions, often half of a preference row, never reach the (·, V) projection.
    """
    logits = model(ids, keep=labels != IGNORE_INDEX)  # (N, V)
    return kept_sequence_logps(logits, labels)


def pair_logps(model: torch.nn.Module, batch: Batch) -> PairLogps:
    """One forward over [chosen rows; rejected rows] (2B, T) → per-sequence log-probs."""
    ids = torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]])  # (2B, T)
    labels = torch.cat([batch["chosen_labels"], batch["rejected_labels"]])
    logps, counts = response_logps(model, ids, labels)  # (2B,), (2B,)
    b = batch["chosen_input_ids"].shape[0]
    return PairLogps(logps[:b], logps[b:], counts[:b], counts[b:])


def kto_logps(model: torch.nn.Module, batch: Batch, kl: bool = False) -> Tensor:
    """Summed response log-probs of the KTO examples (2B,), or of their mismatched KL rows."""
    prefix = "kl_" if kl else ""
    return response_logps(model, batch[f"{prefix}input_ids"], batch[f"{prefix}labels"])[0]


def pair_count(batch: Batch) -> int:
    """Pairs in a paired batch: what the engine divides the step's loss by."""
    return int(batch["chosen_input_ids"].shape[0])


def example_count(batch: Batch) -> int:
    """KTO examples in a batch (two per pair)."""
    return int(batch["desirable"].numel())


def _pair_sums(out: PairLosses, pol: PairLogps) -> dict[str, Tensor]:
    """Per-pair metrics, summed (the engine turns them into means over pairs)."""
    c, r = out.chosen_rewards, out.rejected_rewards
    return {"rewards/chosen": c.sum(), "rewards/rejected": r.sum(), "rewards/margins": (c - r).sum(),
            "rewards/accuracies": (c > r).float().sum(),
            "logps/chosen": pol.chosen.detach().sum(), "logps/rejected": pol.rejected.detach().sum()}


def _chosen_nll_times_pairs(pol: PairLogps) -> Tensor:
    """Token-mean NLL of the chosen responses of this micro-batch, times its pair count."""
    return -pol.chosen.sum() / pol.chosen_tokens.sum().clamp(min=1) * pol.chosen.shape[0]


class PreferenceObjective:
    """DPO (all loss types, + RPO's NLL), ORPO or SimPO on paired batches."""

    def __init__(self, section: AlignSection, reference: Reference | None) -> None:
        if section.uses_reference and reference is None:
            raise ValueError(f"{section.method} needs a reference")
        self.s, self.reference = section, reference

    def __call__(self, model: torch.nn.Module, batch: Batch) -> LossOutput:
        s = self.s
        pol = pair_logps(model, batch)
        extra: dict[str, Tensor] = {}
        if s.method == "dpo":
            ref = self.reference(batch)  # (B, 2)
            out = dpo_loss(pol.chosen, pol.rejected, ref[:, 0], ref[:, 1], s.beta, s.loss_type, s.label_smoothing,
                           pol.chosen_tokens, pol.rejected_tokens)
            loss_sum = out.losses.sum()
            if s.rpo_alpha:
                nll = _chosen_nll_times_pairs(pol)
                loss_sum = loss_sum + s.rpo_alpha * nll
                extra["nll_loss"] = nll.detach()
        else:
            avg_c = pol.chosen / pol.chosen_tokens.clamp(min=1)
            avg_r = pol.rejected / pol.rejected_tokens.clamp(min=1)
            if s.method == "orpo":
                out, log_odds = orpo_odds_ratio(avg_c, avg_r, s.beta)
                nll = _chosen_nll_times_pairs(pol)
                loss_sum = nll + out.losses.sum()
                # TRL's names: log_odds_chosen = mean log odds ratio, log_odds_ratio = mean log σ(it)
                extra = {"nll_loss": nll.detach(), "log_odds_chosen": log_odds.sum(),
                         "log_odds_ratio": torch.nn.functional.logsigmoid(log_odds).sum()}
            else:
                out = simpo_loss(avg_c, avg_r, s.beta, s.gamma, s.label_smoothing)
                loss_sum = out.losses.sum()
        return LossOutput(loss_sum, pair_count(batch), model_aux_loss(model), {**_pair_sums(out, pol), **extra})


class KTOObjective:
    """KTO on the examples of `align.data.KTOLoader` (desirable rows first, then undesirable)."""

    def __init__(self, section: AlignSection, reference: Reference) -> None:
        self.s, self.reference = section, reference

    def __call__(self, model: torch.nn.Module, batch: Batch) -> LossOutput:
        s = self.s
        logps = kto_logps(model, batch)  # (2B,)
        with torch.no_grad():
            kl_logps = kto_logps(model, batch, kl=True)  # (2B,)
        ref = self.reference(batch)  # (B, 4): chosen, rejected, kl chosen-side, kl rejected-side
        ref_logps = torch.cat([ref[:, 0], ref[:, 1]])
        ref_kl = torch.cat([ref[:, 2], ref[:, 3]])
        # z0 over every rank's mismatched rows (TRL gathers it across processes too)
        stats = all_reduce_sum(torch.stack([(kl_logps - ref_kl).sum().double(),
                                            torch.tensor(float(ref_kl.numel()), dtype=torch.float64,
                                                         device=ref_kl.device)]))
        kl = kto_kl_estimate(stats[0], stats[1]).to(logps.dtype)
        desirable = batch["desirable"].bool()
        losses, rewards = kto_loss(logps, ref_logps, desirable, kl, s.beta, s.desirable_weight, s.undesirable_weight)
        n, b = losses.numel(), desirable.sum()
        chosen_r, rejected_r = rewards[desirable], rewards[~desirable]
        scale = n / b.clamp(min=1)  # chosen metrics are means over the desirable half
        sums = {"rewards/chosen": chosen_r.sum() * scale, "rewards/rejected": rejected_r.sum() * scale,
                "rewards/margins": (chosen_r - rejected_r).sum() * scale,
                "rewards/accuracies": (chosen_r > rejected_r).float().sum() * scale,
                "logps/chosen": logps[desirable].detach().sum() * scale,
                "logps/rejected": logps[~desirable].detach().sum() * scale,
                "kl": kl.detach() * n}
        return LossOutput(losses.sum(), example_count(batch), model_aux_loss(model), sums)


class RewardObjective:
    """Bradley–Terry loss of a `model.reward.RewardModel` on paired batches."""

    def __init__(self, section: RewardSection) -> None:
        self.s = section

    def __call__(self, model: torch.nn.Module, batch: Batch) -> LossOutput:
        ids = torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]])  # (2B, T)
        mask = torch.cat([batch["chosen_attention_mask"], batch["rejected_attention_mask"]])
        rewards = model(ids, attention_mask=mask)  # (2B,)
        b = pair_count(batch)
        rc, rr = rewards[:b], rewards[b:]
        losses = reward_model_loss(rc, rr, self.s.margin, self.s.center_rewards_coefficient)
        d = (rc - rr).detach()
        sums = {"accuracy": (d > 0).float().sum(), "margin": d.sum(),
                "rewards/chosen": rc.detach().sum(), "rewards/rejected": rr.detach().sum()}
        return LossOutput(losses.sum(), b, model_aux_loss(model), sums)
