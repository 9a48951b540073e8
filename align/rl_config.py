"""Typed config of online RL (`align/train_online.py`): PPO, GRPO, GSPO and rejection-sampling FT.

`RLConfig` is the SFT config (`finetune.config.SFTConfig`: the policy from
``checkpointing.init_from``, optional ``lora:`` / ``qlora:``) plus an ``rl:`` section:

    rl:
      algorithm: grpo | gspo | ppo | rft
      prompts: data/prompts/rl_prompts.jsonl     # default <data_dir>/prompts/rl_prompts.jsonl
      val_prompts: 64                            # the file's last N prompts: held out, never trained on
                                                 # (their mean reward every training.eval_interval steps)
      val_samples: 1                             # samples per held-out prompt (temperature as sampling)
      prompts_per_step: 8                        # prompts of one rollout, all ranks together
      group_size: 8                              # G samples per prompt (rft: k)
      sampling: {temperature, top_p, top_k, max_new_tokens, stop}
      rewards: [{type: verifiable, weight: 1.0}, {type: format, weight: 0.1}, ...]   (align.rewards)
      share_prompts: true                        # training forward: a prompt once, then its completions
      grpo / gspo: scale_rewards, epsilon, epsilon_high, beta, num_iterations, loss_aggregation,
                   dynamic_sampling, max_refills, mask_truncated_completions, reference,
                   skip_zero_variance
      ppo:         gamma, lam, kl_coef, kl_penalty, whiten_advantages, vf_coef, cliprange_value,
                   ppo_epochs, num_minibatches, value_model, epsilon, reference
      rft:         steps_per_round, min_reward

One rollout feeds ``num_iterations`` (GRPO/GSPO), ``ppo_epochs × num_minibatches`` (PPO) or
``steps_per_round`` (RFT) optimizer steps. ``training.batch_size`` is the sequences of one
micro-batch (forward memory); the micro-batches of one optimizer step follow from the rollout
size, so ``training.grad_accum_steps`` is derived (`RLSection.grad_accum_steps`).
A key of another algorithm (``gamma`` with ``grpo``) is an error naming it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

from pydantic import Field, NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt, model_validator

from align.rewards import RewardSpec
from finetune.config import SFTConfig, SFTSection
from utils.config import RepoPath, Section

ALGORITHMS = ("grpo", "gspo", "ppo", "rft")
# each algorithm's own keys and their defaults (None: stays unset)
ALGO_KEYS: dict[str, dict[str, object]] = {
    "grpo": {"scale_rewards": "group", "epsilon": 0.2, "epsilon_high": None, "beta": 0.0, "num_iterations": 1,
             "loss_aggregation": "token_mean", "dynamic_sampling": False, "max_refills": 4,
             "mask_truncated_completions": False, "reference": "auto", "skip_zero_variance": 0.0},
    # GSPO (Zheng et al. 2025, §5): sequence-level ratios need a far smaller clip range, 3e-4 / 4e-4
    "gspo": {"scale_rewards": "group", "epsilon": 3e-4, "epsilon_high": 4e-4, "beta": 0.0, "num_iterations": 1,
             "loss_aggregation": "sequence_mean", "dynamic_sampling": False, "max_refills": 4,
             "mask_truncated_completions": False, "reference": "auto", "skip_zero_variance": 0.0},
    "ppo": {"gamma": 1.0, "lam": 0.95, "kl_coef": 0.05, "kl_penalty": "reward", "whiten_advantages": True,
            "vf_coef": 0.1, "cliprange_value": 0.2, "ppo_epochs": 2, "num_minibatches": 1, "value_model": None,
            "epsilon": 0.2, "reference": "auto"},
    "rft": {"steps_per_round": 4, "min_reward": 1.0},
}


class SamplingSection(Section):
    """How rollouts are sampled (the generation engine's `SamplingParams`)."""

    temperature: PositiveFloat = 1.0  # the training log-probs use the same temperature
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: NonNegativeInt = 0
    max_new_tokens: PositiveInt = 64
    stop: list[str] = Field(default_factory=list)  # stop strings (the end of the assistant turn always stops)


class RLSection(Section):
    algorithm: Literal[ALGORITHMS] = "grpo"
    prompts: Optional[RepoPath] = None  # None → <data_dir>/prompts/rl_prompts.jsonl
    val_prompts: NonNegativeInt = 64
    val_samples: PositiveInt = 1  # samples per held-out prompt (the held-out reward is their mean)
    prompts_per_step: PositiveInt = 8
    group_size: PositiveInt = 8
    sampling: SamplingSection = Field(default_factory=SamplingSection)
    rewards: list[RewardSpec] = Field(default_factory=lambda: [RewardSpec(type="verifiable")], min_length=1)
    kv_cache_memory_mb: Optional[PositiveFloat] = None  # rollout KV pool (None: the engine's default)
    # the training forward lays each prompt out once, followed by its G completions (they attend to it
    # as a shared prefix): exact, and G-fold less prompt compute (grpo, gspo, ppo); false: one row per sample
    share_prompts: bool = True
    # grpo / gspo
    scale_rewards: Optional[Literal["group", "batch", "none"]] = None
    epsilon: Optional[PositiveFloat] = None
    epsilon_high: Optional[PositiveFloat] = None
    beta: Optional[NonNegativeFloat] = None  # k3 KL to the reference; 0 → no reference model at all
    num_iterations: Optional[PositiveInt] = None  # μ: optimizer steps per rollout (old log-probs kept)
    loss_aggregation: Optional[Literal["token_mean", "sequence_mean", "dr_grpo"]] = None
    dynamic_sampling: Optional[bool] = None  # DAPO: drop groups whose rewards are all equal, refill
    max_refills: Optional[NonNegativeInt] = None  # extra prompt batches tried per rollout when dropping
    # selective rollouts (GRESO, Zheng et al. 2025): a prompt whose last z groups all had equal rewards
    # (no gradient) is passed over with probability 1 - (1 - s)^z; 0 = every prompt in turn
    skip_zero_variance: Optional[float] = Field(None, ge=0.0, lt=1.0)
    mask_truncated_completions: Optional[bool] = None  # DAPO overlong filtering: cut-off samples get no gradient
    reference: Optional[Literal["auto", "frozen", "adapters_off"]] = None
    # ppo
    gamma: Optional[float] = Field(None, ge=0.0, le=1.0)
    lam: Optional[float] = Field(None, ge=0.0, le=1.0)
    kl_coef: Optional[NonNegativeFloat] = None
    kl_penalty: Optional[Literal["reward", "loss"]] = None  # k1 in the per-token reward, or a k3 loss term
    whiten_advantages: Optional[bool] = None
    vf_coef: Optional[NonNegativeFloat] = None
    cliprange_value: Optional[PositiveFloat] = None
    ppo_epochs: Optional[PositiveInt] = None
    num_minibatches: Optional[PositiveInt] = None
    value_model: Optional[RepoPath] = None  # a reward-model checkpoint to start the value model from
    # rft
    steps_per_round: Optional[PositiveInt] = None
    min_reward: Optional[float] = None  # samples whose reward reaches it are kept

    @model_validator(mode="after")
    def _algorithm_keys(self) -> "RLSection":
        own = ALGO_KEYS[self.algorithm]
        common = {"algorithm", "prompts", "val_prompts", "val_samples", "prompts_per_step", "group_size",
                  "sampling", "rewards", "kv_cache_memory_mb", "share_prompts"}
        for key in sorted(self.model_fields_set - common):
            if key not in own and getattr(self, key) is not None:
                users = [a for a, keys in ALGO_KEYS.items() if key in keys]
                raise ValueError(f"rl.{key} belongs to {' / '.join(users)}, not {self.algorithm} "
                                 f"(its keys: {', '.join(sorted(own))})")
        return self

    def fill_defaults(self) -> None:
        """Give every key of the algorithm its default (for config.yaml and the code)."""
        for key, default in ALGO_KEYS[self.algorithm].items():
            if getattr(self, key) is None and default is not None:
                setattr(self, key, default)

    def check(self) -> None:
        """Impossible combinations (after `fill_defaults`); ValueError with one line."""
        if self.algorithm in ("grpo", "gspo"):
            if self.group_size < 2 and self.scale_rewards != "none":
                raise ValueError(f"rl.group_size={self.group_size}: group-normalised advantages need G >= 2 "
                                 "samples per prompt")
            if self.group_size < 2:
                raise ValueError(f"rl.group_size={self.group_size}: GRPO's baseline is the group mean, which "
                                 "needs G >= 2 samples per prompt")
        if self.epsilon_high is not None and self.epsilon is not None and self.epsilon_high < self.epsilon:
            raise ValueError(f"rl.epsilon_high={self.epsilon_high} is below rl.epsilon={self.epsilon}: clip-higher "
                             "(DAPO) widens the upper bound only")
        if self.algorithm == "ppo" and self.kl_coef and self.reference is None:
            self.reference = "auto"

    @property
    def uses_reference(self) -> bool:
        if self.algorithm in ("grpo", "gspo"):
            return bool(self.beta)
        if self.algorithm == "ppo":
            return bool(self.kl_coef)
        return False

    @property
    def updates_per_rollout(self) -> int:
        """Optimizer steps one rollout feeds."""
        if self.algorithm == "ppo":
            return self.ppo_epochs * self.num_minibatches
        if self.algorithm == "rft":
            return self.steps_per_round
        return self.num_iterations

    def prompts_path(self, data_dir: Path) -> Path:
        return self.prompts if self.prompts is not None else data_dir / "prompts" / "rl_prompts.jsonl"


class RLConfig(SFTConfig):
    """The root config of an online RL run."""

    stage: Literal["rl"] = "rl"
    sft: Optional[SFTSection] = None  # an SFT-only section: refused below
    rl: RLSection = Field(default_factory=RLSection)

    @model_validator(mode="after")
    def _check_rl(self) -> "RLConfig":
        if self.sft is not None:
            raise ValueError("the `sft:` section belongs to SFT; online RL generates its own samples")
        self.rl.fill_defaults()
        self.rl.check()
        return self
