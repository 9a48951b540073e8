"""Online RL as a stage of the one engine: PPO, GRPO, GSPO and rejection-sampling fine-tuning.

    python align/train_online.py --config_path configs/align/grpo.yaml     # rl.algorithm: grpo | gspo | ppo | rft
        [--set key=value ...] [--resume auto|PATH] [--print_config] [--compile] [--device ...] [--merge_and_save]
    torchrun --nproc_per_node=N align/train_online.py --config_path ...    # DDP: prompts sharded, groups per rank

As every stage, this is data + loss + which parameters train, handed to `trainer.engine.Trainer`:
the data is a `align.rollout.RolloutSource` (it samples from the live policy through the
generation engine and scores with `align.rewards`), the losses are `align.rl_objectives`
(pure math in `align.rl_losses`). Validation is the mean reward of ``rl.val_samples`` samples (1
by default) per held-out prompt (pass@1 with sampling for the verifiable reward; the same seeds
at every evaluation; its wall time is logged as ``time/val_s``),
logged as ``val_reward`` with ``val_rewards/<name>`` per function; ``val_loss`` is its negative,
so the "best" checkpoint is the one with the highest held-out reward.

* The policy is ``checkpointing.init_from`` (usually the SFT model), full weights or LoRA /
  QLoRA (``lora:`` / ``qlora:``), built as for SFT.
* The reference (``beta > 0``, PPO's ``kl_coef > 0``): ``frozen`` (a second copy, full weights)
  or ``adapters_off`` (LoRA / QLoRA: the same weights with the adapters switched off).
  ``beta: 0`` builds no reference model at all.
* PPO's critic is a `model.reward.RewardModel` (per-token values from its ``score`` head)
  started from the policy's weights or from ``rl.value_model`` (a reward model); it trains with
  the policy as one `ActorCritic`. Its step checkpoints hold both (``policy.*``, ``value.*``),
  its ``final`` the policy alone.

Runs go to ``runs/rl/<run_name>/``: config.yaml, train.log, metrics.jsonl (reward mean / std
and per function, KL, clip fractions, entropy, completion length, the rollout's time split),
loss.png, reward.png, checkpoints/.
"""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any, Optional

import torch

from align.rewards import RewardFunctions
from align.rl_config import RLConfig
from align.rl_data import Sample, encode_prompts, read_prompts, request_seed, split_prompts
from align.rl_objectives import ActorCritic, PolicyGradientObjective, PPOObjective, reference_logps_fn
from align.rollout import Generator, RolloutSource
from data_pipeline.chat import ChatTokenizer
from finetune.base_model import BaseModelSource, build_sft_model
from finetune.config import LoraSection, check_method_sections, resolve_model_config
from finetune.peft.adapters import AdapterTrainer, export_final, optimizer_factory, trainable_filter
from finetune.base_model import check_base_tokenizer
from finetune.sft import check_inputs
from model import count_params
from model.reward import reward_backbone_config
from trainer.distributed import DistInfo, all_reduce_sum
from trainer.engine import Trainer
from trainer.launch import flag_overrides, launch, start_run, training_arg_parser
from trainer.losses import causal_lm_loss, count_targets
from utils.config import load_config, to_yaml
from utils.device import autocast_context, pick_dtype
from utils.errors import UserError

STAGE = "rl"
logger = logging.getLogger(__name__)


def weight_method(cfg: RLConfig) -> str:
    return "qlora" if cfg.qlora is not None else "lora" if cfg.lora is not None else "full"


def prepare(cfg: RLConfig) -> tuple[BaseModelSource, str]:
    """Check the sections, open the policy and resolve ``cfg.model`` from it (before anything is written)."""
    rl = cfg.rl
    method = weight_method(cfg)
    check_method_sections(cfg, method)
    if rl.algorithm == "ppo" and method != "full":
        raise UserError("rl.algorithm=ppo trains a value model beside the policy and needs full weights; "
                        "with LoRA/QLoRA use grpo, gspo or rft")
    source = BaseModelSource.open(cfg.checkpointing.init_from)
    source.require_policy()
    cfg.model = resolve_model_config(source.config, cfg.model, source.path)
    if rl.uses_reference:
        if rl.reference == "auto":
            rl.reference = "adapters_off" if method != "full" else "frozen"
        if rl.reference == "adapters_off" and method == "full":
            raise UserError("rl.reference=adapters_off needs LoRA/QLoRA adapters; with full weights use frozen")
    if cfg.model.max_seq_len <= rl.sampling.max_new_tokens:
        raise UserError(f"rl.sampling.max_new_tokens={rl.sampling.max_new_tokens} leaves no room for a prompt in "
                        f"the model's max_seq_len {cfg.model.max_seq_len}")
    return source, method


def shares_prompts(cfg: RLConfig) -> bool:
    """Whether the training forward packs a prompt once with its completions (``rl.share_prompts``):
    every layer must attend (a Mamba-2 scan cannot fork its state) and the sequence must not be
    split across ranks (context parallelism)."""
    return (cfg.rl.share_prompts and not cfg.model.has_mamba
            and cfg.training.context_parallel == 1)


def grad_accum_steps(cfg: RLConfig, world_size: int) -> int:
    """Micro-batches of ``training.batch_size`` sequences in one optimizer step on one rank."""
    rl = cfg.rl
    if rl.prompts_per_step % world_size:
        raise UserError(f"rl.prompts_per_step={rl.prompts_per_step} must be a multiple of the number of processes "
                        f"({world_size}): each rank samples whole groups")
    rows = rl.prompts_per_step // world_size * rl.group_size
    minibatches = rl.num_minibatches if rl.algorithm == "ppo" else 1
    if rows % minibatches:
        raise UserError(f"rl.num_minibatches={minibatches} does not divide the {rows} sequences of a rollout per rank")
    return max(1, -(-rows // minibatches // cfg.training.batch_size))


# ---------------------------------------------------------------------------- the engine, with RL's validation
class _RLMixin:
    """Validation = mean reward on the held-out prompts; rollout statistics in every record."""

    rl_val: list = []
    rl_generator: Optional[Generator] = None
    rl_rewards: Optional[RewardFunctions] = None

    def extra_metrics(self) -> dict[str, Any]:
        return self.train_data.pop_stats()

    def final_weights(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if any(k.startswith("value.") for k in state):  # PPO: the policy without its critic
            return {k[len("policy."):]: v for k, v in state.items() if k.startswith("policy.")}
        return state

    def validate(self) -> dict[str, float]:
        t0 = time.perf_counter()
        result = held_out_reward(self.rl_generator, self.rl_rewards, self.rl_val, self.dist, self.cfg.training.seed,
                                 self.cfg.rl.val_samples)
        self.last_val, self.last_val_step = result, self.step
        best = self.ckpt.note_validation(result["val_loss"])
        self._record({**result, "best": best, "time/val_s": time.perf_counter() - t0})
        logger.info("step %d | held-out reward %.4f (%s)%s", self.step, result["val_reward"],
                    ", ".join(f"{k[len('val_rewards/'):]} {v:.3f}" for k, v in result.items()
                              if k.startswith("val_rewards/")), " (best)" if best else "")
        return result


class RLTrainer(_RLMixin, Trainer):
    pass


class RLAdapterTrainer(_RLMixin, AdapterTrainer):
    pass


def held_out_reward(generator: Generator, rewards: RewardFunctions, prompts: list, dist: DistInfo,
                    seed: int, samples_per_prompt: int = 1) -> dict[str, float]:
    """``samples_per_prompt`` samples of each held-out prompt (this rank's share), the same seeds
    for a prompt at every evaluation; mean total reward, per function, and completion length
    over all ranks and samples."""
    mine = [p for k, p in enumerate(prompts) if k % dist.world_size == dist.rank]
    names = rewards.names
    sums = torch.zeros(3 + len(names), dtype=torch.float64)
    if mine:
        seeds = [[request_seed(seed, "val", p.index, *([j] if j else [])) for j in range(samples_per_prompt)]
                 for p in mine]  # sample 0's seed as with one sample per prompt
        groups = generator.generate(mine, samples_per_prompt, seeds)
        samples: list[Sample] = [s for g in groups for s in g]
        total, parts = rewards([s.prompt.prompt for s in samples], [s.text for s in samples],
                               [s.prompt.record for s in samples])
        sums[0], sums[1] = len(samples), total.double().sum()
        sums[2] = float(sum(len(s.completion_ids) for s in samples))
        for i, name in enumerate(names):
            sums[3 + i] = parts[name].double().sum()
    sums = all_reduce_sum(sums)
    n = max(sums[0].item(), 1.0)
    reward = sums[1].item() / n
    out = {"val_loss": -reward, "val_reward": reward, "val_completion_length": sums[2].item() / n}
    out.update({f"val_rewards/{name}": sums[3 + i].item() / n for i, name in enumerate(names)})
    return out


# ---------------------------------------------------------------------------- building the stage
def build_trainer(cfg: RLConfig, method: str, source: BaseModelSource, dist: DistInfo,
                  resume: Optional[str] = None) -> Trainer:
    rl, tcfg = cfg.rl, cfg.training
    if rl.algorithm != "rft" and "spike_threshold" not in tcfg.model_fields_set:
        # A policy-gradient surrogate's value is no measure of the model's health (its sign and size
        # follow the batch's advantages): the spike guard skips only non-finite losses and gradients.
        tcfg.spike_threshold = math.inf
    if dist.is_distributed and tcfg.parallelism == "fsdp":
        raise UserError("online RL samples from a full copy of the policy on every rank: use "
                        "training.parallelism=ddp (FSDP2 shards the weights the rollout engine reads)")
    tokenizer_dir, tok_hash = check_inputs(cfg, method, source, dist)
    accum = grad_accum_steps(cfg, dist.world_size)
    tcfg.grad_accum_steps = accum
    from tokenizers import Tokenizer

    tokenizer_file = tokenizer_dir / "tokenizer.json"
    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    ct = ChatTokenizer.wrap(Tokenizer.from_file(str(tokenizer_file)))
    path = rl.prompts_path(cfg.data.data_dir)
    prompts = encode_prompts(read_prompts(path), ct, cfg.model.max_seq_len - rl.sampling.max_new_tokens, path)
    train_prompts, val_prompts = split_prompts(prompts, rl.val_prompts, path)
    compute_dtype = pick_dtype(tcfg.dtype, dist.device)
    rewards = RewardFunctions(rl.rewards, tokenizer_file, dist.device)
    run = start_run(cfg, STAGE, dist, resume)
    amp = lambda: autocast_context(dist.device, compute_dtype)  # noqa: E731
    policy = build_sft_model(source, cfg, method, dist.device, compute_dtype)
    model: torch.nn.Module = policy
    value = None
    if rl.algorithm == "ppo":
        value = build_value_model(cfg, source, dist, compute_dtype, tok_hash)
        model = ActorCritic(policy, value)
    reference = None
    if rl.uses_reference:
        ref_model = policy
        if rl.reference == "frozen":
            ref_model = build_sft_model(BaseModelSource.open(source.path), cfg, "full", dist.device, compute_dtype)
            ref_model.requires_grad_(False).eval()
        reference = reference_logps_fn(ref_model, rl.sampling.temperature, amp,
                                       adapters_off=rl.reference == "adapters_off")
    rows_per_rank = rl.prompts_per_step // dist.world_size * rl.group_size
    generator = Generator(policy, cfg.model, tokenizer, tokenizer_file, ct, rl,
                          max_num_seqs=max(rows_per_rank, (len(val_prompts) // dist.world_size + 1) * rl.val_samples))
    source_ = RolloutSource(rl, train_prompts, generator, rewards, dist, tcfg.seed, tcfg.batch_size, accum, amp,
                            ct.pad_id, reference=reference, value_model=value,
                            share_prompts=shares_prompts(cfg))
    log_setup(cfg, method, source, train_prompts, val_prompts, accum, dist)
    if rl.algorithm == "rft":
        objective, count_fn = causal_lm_loss, count_targets
    elif rl.algorithm == "ppo":
        objective = PPOObjective(rl)
        count_fn = objective.count
    else:
        objective = PolicyGradientObjective(rl)
        count_fn = objective.count
    common = dict(stage=rl.algorithm, val_data=(lambda: iter(())) if val_prompts else None, count_fn=count_fn,
                  tokenizer_dir=tokenizer_dir, validate_first=True)
    if method == "full":
        trainer: Trainer = RLTrainer(cfg, model, objective, source_, run, dist, **common)
    else:
        trainer = RLAdapterTrainer(cfg, model, objective, source_, run, dist, trainable=trainable_filter(model),
                                   optimizer_factory=optimizer_factory(cfg), base_model_path=str(source.path),
                                   **common)
    trainer.rl_val, trainer.rl_generator, trainer.rl_rewards = val_prompts, generator, rewards
    return trainer


def build_value_model(cfg: RLConfig, source: BaseModelSource, dist: DistInfo, compute_dtype: torch.dtype,
                      tok_hash: str) -> torch.nn.Module:
    """PPO's critic: a reward model (per-token values) from ``rl.value_model`` or the policy's weights."""
    if cfg.rl.value_model is not None:
        vsource = BaseModelSource.open(cfg.rl.value_model)
        check_base_tokenizer(vsource, tok_hash)
        vcfg = cfg.model_copy(update={"model": reward_backbone_config(vsource.config)})
        logger.info("value model: the reward model %s", vsource.path)
    else:
        vsource, vcfg = BaseModelSource.open(source.path), cfg
        logger.info("value model: the policy's weights + a fresh value head")
    return build_sft_model(vsource, vcfg, "full", dist.device, compute_dtype, reward=True)


def log_setup(cfg: RLConfig, method: str, source: BaseModelSource, train_prompts: list, val_prompts: list,
              accum: int, dist: DistInfo) -> None:
    rl = cfg.rl
    total = count_params(cfg.model)["total"]
    logger.info("%s policy (%s weights) from %s: %.2fM parameters; %d train / %d held-out prompts; "
                "%d prompts x %d samples per rollout, %d optimizer step(s) per rollout, %d micro-batch(es) of %d "
                "per step and rank; reference: %s", rl.algorithm, method, source.path, total / 1e6,
                len(train_prompts), len(val_prompts), rl.prompts_per_step, rl.group_size, rl.updates_per_rollout,
                accum, cfg.training.batch_size, rl.reference if rl.uses_reference else "none")
    if rl.algorithm != "rft":
        if shares_prompts(cfg):
            logger.info("training forward: each prompt once, followed by its completions (rl.share_prompts)")
        else:
            logger.info("training forward: one prompt + completion row per sample (%s)",
                        "rl.share_prompts: false" if not rl.share_prompts else
                        "the model has Mamba-2 layers" if cfg.model.has_mamba
                        else "context parallelism")


def plot_rewards(run_root: Path) -> Optional[Path]:
    """reward.png: the rollouts' mean reward and the held-out reward against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from utils.plot_metrics import read_metrics, series

    path = run_root / "metrics.jsonl"
    if not path.exists():
        return None
    records = read_metrics(path)
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label in (("reward", "rollout reward (train prompts)"), ("val_reward", "held-out reward")):
        steps, values = series(records, key)
        if steps:
            ax.plot(steps, values, marker="o" if key == "val_reward" else None, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("mean reward")
    ax.grid(alpha=0.3)
    ax.legend()
    out = run_root / "reward.png"
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def train(cfg: RLConfig, resume: Optional[str] = None, stop_at: Optional[int] = None) -> dict[str, Any]:
    source, method = prepare(cfg)
    with launch(cfg) as dist:
        trainer = build_trainer(cfg, method, source, dist, resume)
        trainer.resume(resume)
        summary = trainer.fit(stop_at=stop_at)
        final = summary["final_checkpoint"]
        if method != "full" and final is not None:
            export_final(trainer, source, cfg, method, final, cfg.data.tokenizer_path())
        if dist.is_main:
            plot_rewards(trainer.run.root)
        return summary


def main() -> None:
    parser = training_arg_parser("Online RL (PPO, GRPO, GSPO, rejection-sampling fine-tuning) with rollouts "
                                 "through the paged generation engine")
    parser.add_argument("--merge_and_save", action="store_true",
                        help="LoRA/QLoRA: also write checkpoints/final with the adapters merged into the weights")
    args = parser.parse_args()
    cfg = load_config(args.config_path, RLConfig, flag_overrides(args))
    if args.merge_and_save:
        if weight_method(cfg) == "full":
            raise UserError("--merge_and_save merges LoRA/QLoRA adapters; this config trains full weights")
        cfg.lora = cfg.lora or LoraSection()
        cfg.lora.merge_and_save = True
    if args.print_config:
        prepare(cfg)
        print(to_yaml(cfg), end="")
        return
    train(cfg, resume=args.resume)
