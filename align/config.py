"""Typed config of the offline alignment stages (reward model, DPO family, ORPO, SimPO, KTO).

`AlignConfig` is the SFT config (`finetune.config.SFTConfig`: base model in
``checkpointing.init_from``, its config merged with ``model:``, optional ``lora:`` / ``qlora:``)
plus one stage section, strict like the rest:

    align:   method (dpo | orpo | simpo | kto), beta, and the method's own keys:
               dpo    loss_type, label_smoothing, rpo_alpha, reference
               orpo   —                          (no reference model)
               simpo  gamma, label_smoothing     (no reference model)
               kto    desirable_weight, undesirable_weight, reference
             reference: frozen | precompute | adapters_off (default: adapters_off with LoRA /
             QLoRA, else precompute); precompute_batch_size
    reward:  margin, center_rewards_coefficient   (align/train_reward_model.py)

A key of another method (``gamma`` with ``dpo``) is an error naming it, not silently ignored.
Unset keys get the method's defaults after validation, so the saved config.yaml states them.
"""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, NonNegativeFloat, PositiveFloat, PositiveInt, model_validator

from align.losses import DPOLossType
from finetune.config import SFTConfig, SFTSection
from utils.config import Section

METHODS = ("dpo", "orpo", "simpo", "kto")
REFERENCES = ("frozen", "precompute", "adapters_off")
# each method's own keys (besides method, beta) and their defaults
METHOD_KEYS: dict[str, dict[str, object]] = {
    "dpo": {"loss_type": "sigmoid", "label_smoothing": 0.0, "rpo_alpha": 0.0, "reference": "auto",
            "precompute_batch_size": None},
    "orpo": {},
    "simpo": {"gamma": 1.0, "label_smoothing": 0.0},
    "kto": {"desirable_weight": 1.0, "undesirable_weight": 1.0, "reference": "auto", "precompute_batch_size": None},
}
DEFAULT_BETA = {"dpo": 0.1, "orpo": 0.1, "simpo": 2.0, "kto": 0.1}


class AlignSection(Section):
    method: Literal[METHODS] = "dpo"
    beta: Optional[PositiveFloat] = None  # None → the method's default (DEFAULT_BETA)
    # dpo
    loss_type: Optional[DPOLossType] = None
    rpo_alpha: Optional[NonNegativeFloat] = None  # weight of the NLL of the chosen responses (RPO, Pang et al. 2024)
    # dpo (sigmoid = cDPO, robust), simpo
    label_smoothing: Optional[float] = Field(None, ge=0.0, lt=0.5)
    # simpo: target reward margin γ
    gamma: Optional[NonNegativeFloat] = None
    # kto: weights of the desirable / undesirable examples' losses
    desirable_weight: Optional[NonNegativeFloat] = None
    undesirable_weight: Optional[NonNegativeFloat] = None
    # dpo, kto: where the reference log-probs come from
    reference: Optional[Literal["auto", "frozen", "precompute", "adapters_off"]] = None
    precompute_batch_size: Optional[PositiveInt] = None  # None → training.batch_size

    @model_validator(mode="after")
    def _method_keys(self) -> "AlignSection":
        own = METHOD_KEYS[self.method]
        for key in sorted(self.model_fields_set - {"method", "beta"}):
            if key not in own and getattr(self, key) is not None:
                users = [m for m, keys in METHOD_KEYS.items() if key in keys]
                allowed = ", ".join(sorted(own)) or "none besides beta"
                raise ValueError(f"align.{key} belongs to method {' / '.join(users)}, not {self.method} "
                                 f"(its keys: {allowed})")
        if self.method == "kto" and self.desirable_weight == 0 and self.undesirable_weight == 0:
            raise ValueError("align.desirable_weight and align.undesirable_weight are both 0: nothing would train")
        return self

    def fill_defaults(self) -> None:
        """Give every key of the method its default (for config.yaml and the code)."""
        if self.beta is None:
            self.beta = DEFAULT_BETA[self.method]
        for key, default in METHOD_KEYS[self.method].items():
            if getattr(self, key) is None and default is not None:
                setattr(self, key, default)

    @property
    def uses_reference(self) -> bool:
        return self.method in ("dpo", "kto")


class RewardSection(Section):
    margin: float = 0.0  # r_c - r_r must exceed it: -log σ(r_c - r_r - margin)
    center_rewards_coefficient: Optional[NonNegativeFloat] = None  # + c · (r_c + r_r)² (TRL's reward centring)


class AlignConfig(SFTConfig):
    """The root config of an alignment run; the script decides which section it needs."""

    stage: Literal["align"] = "align"
    sft: Optional[SFTSection] = None  # an SFT-only section: refused below
    align: Optional[AlignSection] = None
    reward: Optional[RewardSection] = None

    @model_validator(mode="after")
    def _check_align(self) -> "AlignConfig":
        if self.sft is not None:
            raise ValueError("the `sft:` section belongs to SFT; preference pairs are never packed")
        if self.align is not None and self.reward is not None:
            raise ValueError("a config has either `align:` (align/train_offline.py) or `reward:` "
                             "(align/train_reward_model.py), not both")
        return self
