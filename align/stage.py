"""The offline alignment stages: a reward model, or a policy trained on preference pairs.

    python align/train_reward_model.py --config_path configs/align/reward_model.yaml
    python align/train_offline.py --config_path configs/align/dpo.yaml      # align.method: dpo | orpo | simpo | kto
        [--set key=value ...] [--resume auto|PATH] [--print_config] [--compile] [--device ...] [--merge_and_save]
    torchrun --nproc_per_node=N align/train_offline.py --config_path ...    # DDP (full weights also FSDP2)

As every stage, this is data + loss + which parameters train, handed to the one engine
(`trainer.engine.Trainer`): the collators of `align.data`, the objectives of
`align.objectives` (pure losses in `align.losses`), the reference of `align.reference`.

* The starting model is ``checkpointing.init_from`` (our checkpoint or a Hugging Face
  directory; usually the SFT model), built as for SFT (`finetune.base_model`): full weights,
  or LoRA / QLoRA when the config has a ``lora:`` / ``qlora:`` section.
* The reward model is that backbone with a fresh scalar ``score`` head
  (`model.reward.RewardModel`); its checkpoints say ``"task": "reward_model"`` in
  config.json, and its ``final`` always holds full (merged) weights, ready to score
  (`align/score.py`) or to export (`utils/convert_hf.py --to_hf`, as
  ``*ForSequenceClassification``).
* A policy's ``final`` is a plain checkpoint (full weights) or, with adapters, the adapters
  (+ merged weights with ``--merge_and_save``), exactly as SFT writes them.

Runs go to ``runs/align/<run_name>/`` (config.yaml, train.log, metrics.jsonl with TRL's metric
names, loss.png, checkpoints/, and for ``reference: precompute`` the stored reference log-probs).
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Optional

import torch

from align.config import AlignConfig, AlignSection, RewardSection
from align.data import build_preference_loaders, check_bins_exist
from align.objectives import KTOObjective, PreferenceObjective, RewardObjective, example_count, pair_count
from align.reference import (ModelReference, PrecomputedReference, compute_table, load_or_compute,
                             table_fingerprint)
from finetune.base_model import BaseModelSource, build_sft_model
from finetune.config import LoraSection, check_method_sections, resolve_model_config
from finetune.peft.adapters import AdapterTrainer, export_final, optimizer_factory, trainable_filter
from finetune.sft import check_inputs
from model import count_params
from model.lora import lora_parameters
from model.lora_io import merged_state_dict
from model.reward import reward_backbone_config
from trainer.distributed import DistInfo
from trainer.engine import Trainer
from trainer.evaluation import TextSampler
from trainer.launch import flag_overrides, launch, start_run, training_arg_parser
from utils.checkpoint import REWARD_MODEL, TASK_KEY, save_checkpoint
from utils.config import load_config, to_yaml
from utils.device import autocast_context, pick_dtype
from utils.errors import UserError

STAGE = "align"
logger = logging.getLogger(__name__)


def weight_method(cfg: AlignConfig) -> str:
    """full / lora / qlora, from which adapter sections the config has."""
    return "qlora" if cfg.qlora is not None else "lora" if cfg.lora is not None else "full"


def prepare(cfg: AlignConfig, reward: bool) -> tuple[BaseModelSource, str]:
    """Check the sections, open the base model and resolve ``cfg.model`` from it (before
    anything is written, so config.yaml holds the resolved model)."""
    if reward:
        if cfg.align is not None:
            raise UserError("the config has an `align:` section: policy methods run with align/train_offline.py; "
                            "a reward-model config has a `reward:` section")
        cfg.reward = cfg.reward or RewardSection()
    else:
        if cfg.reward is not None:
            raise UserError("the config has a `reward:` section: reward models train with "
                            "align/train_reward_model.py; a policy config has an `align:` section")
        cfg.align = cfg.align or AlignSection()
        cfg.align.fill_defaults()
    method = weight_method(cfg)
    check_method_sections(cfg, method)
    source = BaseModelSource.open(cfg.checkpointing.init_from)
    if not reward:
        source.require_policy()
    cfg.model = resolve_model_config(source.config, cfg.model, source.path)
    if reward:
        cfg.model = reward_backbone_config(cfg.model)
    if not reward:
        check_reference(cfg.align, method)
    return source, method


def check_reference(section: AlignSection, method: str) -> None:
    """Resolve ``align.reference: auto`` and refuse what cannot work."""
    if not section.uses_reference:
        return
    if section.reference == "auto":
        section.reference = "adapters_off" if method != "full" else "precompute"
    if section.reference == "adapters_off" and method == "full":
        raise UserError("align.reference=adapters_off needs LoRA/QLoRA adapters (a `lora:` or `qlora:` section); "
                        "with full weights use precompute or frozen")


# ---------------------------------------------------------------------------- the stage
def build_trainer(cfg: AlignConfig, method: str, source: BaseModelSource, dist: DistInfo, reward: bool,
                  resume: Optional[str] = None) -> Trainer:
    """Inputs checked, run directory created, model and reference built: the engine ready to `fit`."""
    tokenizer_dir, tok_hash = check_inputs(cfg, method, source, dist)
    check_bins_exist(cfg)
    kto = not reward and cfg.align.method == "kto"
    train_data, val_data, val_loader = build_preference_loaders(cfg, dist.rank, dist.world_size, tok_hash, kto=kto)
    run = start_run(cfg, STAGE, dist, resume)
    compute_dtype = pick_dtype(cfg.training.dtype, dist.device)
    model = build_sft_model(source, cfg, method, dist.device, compute_dtype, reward=reward)
    log_model(model, cfg, method, source, reward)
    amp = lambda: autocast_context(dist.device, compute_dtype)  # noqa: E731
    count_fn: Callable = pair_count
    if reward:
        objective: Any = RewardObjective(cfg.reward)
    else:
        reference = (build_reference(cfg, method, source, model, train_data, val_loader, run.root, dist, amp,
                                     compute_dtype, kto) if cfg.align.uses_reference else None)  # orpo, simpo: none
        if isinstance(reference, PrecomputedReference):
            val_data = reference.val_batches(val_data)
        if kto:
            objective, count_fn = KTOObjective(cfg.align, reference), example_count
        else:
            objective = PreferenceObjective(cfg.align, reference)
    lcfg = cfg.logging
    sampler = (TextSampler(tokenizer_dir, lcfg.sample_prompt, lcfg.sample_tokens, lcfg.sample_top_k,
                           cfg.training.seed) if lcfg.sample_interval > 0 and not reward else None)
    common = dict(stage="reward_model" if reward else cfg.align.method, val_data=val_data, count_fn=count_fn,
                  tokenizer_dir=tokenizer_dir, sampler=sampler,
                  checkpoint_config={TASK_KEY: REWARD_MODEL} if reward else None)
    if method == "full":
        return Trainer(cfg, model, objective, train_data, run, dist, **common)
    adapters = trainable_filter(model)
    trainable = (lambda name, p: adapters(name, p) or name.startswith("score.")) if reward else adapters
    return AdapterTrainer(cfg, model, objective, train_data, run, dist, trainable=trainable,
                          optimizer_factory=optimizer_factory(cfg), base_model_path=str(source.path), **common)


def build_reference(cfg: AlignConfig, method: str, source: BaseModelSource, model: torch.nn.Module, train_data,
                    val_loader, run_root, dist: DistInfo, amp, compute_dtype: torch.dtype, kto: bool):
    """The reference of ``align.reference`` (see `align.reference`)."""
    kind = cfg.align.reference
    if kind == "adapters_off":
        logger.info("reference: the base model with the adapters switched off (no second copy)")
        return ModelReference(model, kto, amp, adapters_off=True)
    if kind == "frozen":
        frozen = build_sft_model(BaseModelSource.open(source.path), cfg, "full", dist.device, compute_dtype)
        frozen.to(compute_dtype).requires_grad_(False).eval()
        logger.info("reference: a frozen copy of %s", source.path)
        return ModelReference(frozen, kto, amp)
    batch_size = cfg.align.precompute_batch_size or cfg.training.batch_size
    adapters_off = method != "full"

    def compute() -> dict[str, torch.Tensor]:
        return {split: compute_table(model, loader, kto, batch_size, dist.rank, dist.world_size, dist.device, amp,
                                     adapters_off) for split, loader in (("train", train_data), ("val", val_loader))}

    fingerprint = table_fingerprint(kto, str(source.path), train_data, val_loader, cfg.model.model_dump(mode="json"))
    tables = load_or_compute(run_root, fingerprint, compute, dist.is_main)
    return PrecomputedReference(tables["train"], tables["val"])


def log_model(model: torch.nn.Module, cfg: AlignConfig, method: str, source: BaseModelSource, reward: bool) -> None:
    total = count_params(cfg.model)["total"]
    trainable = total if method == "full" else sum(p.numel() for p in lora_parameters(model))
    what = "reward model" if reward else f"{cfg.align.method} policy"
    extra = "" if reward or not cfg.align.uses_reference else f", reference: {cfg.align.reference}"
    logger.info("%s (%s weights) from %s (%s): %.2fM parameters, %.3fM trainable%s", what, method, source.path,
                source.kind, total / 1e6, trainable / 1e6, extra)


def export_reward_final(trainer: Trainer, source: BaseModelSource, cfg: AlignConfig, method: str) -> None:
    """A LoRA / QLoRA reward model's ``final``: full weights with the adapters merged (a fresh
    fp32 base built as in training + the trained adapters and score head), so it scores alone."""
    from model.lora_io import adapter_state_dict

    final = trainer.run.checkpoints / "final"
    fresh = build_sft_model(BaseModelSource.open(source.path), cfg, method, torch.device("cpu"), torch.float32,
                            reward=True)
    target = {**adapter_state_dict(fresh), "score.weight": fresh.score.weight}
    trained = {**adapter_state_dict(trainer.base), "score.weight": trainer.base.score.weight}
    with torch.no_grad():
        for name, t in trained.items():
            target[name].copy_(t.detach().to("cpu", torch.float32))
    save_checkpoint(final, merged_state_dict(fresh), {**cfg.model.model_dump(mode="json"), TASK_KEY: REWARD_MODEL},
                    tokenizer_dir=cfg.data.tokenizer_path(), meta={"stage": "reward_model", "merged_from": method})
    logger.info("final: reward model with merged adapters in %s", final)


def train(cfg: AlignConfig, reward: bool, resume: Optional[str] = None, stop_at: Optional[int] = None) -> dict[str, Any]:
    """Run (or resume) one alignment run; returns the engine's summary."""
    source, method = prepare(cfg, reward)
    with launch(cfg) as dist:
        trainer = build_trainer(cfg, method, source, dist, reward, resume)
        trainer.resume(resume)
        summary = trainer.fit(stop_at=stop_at)
        final = summary["final_checkpoint"]
        if method != "full" and final is not None:  # rank 0 wrote it
            if reward:
                export_reward_final(trainer, source, cfg, method)
            else:
                export_final(trainer, source, cfg, method, final, cfg.data.tokenizer_path())
        return summary


# ---------------------------------------------------------------------------- CLI
def main(reward: bool, description: str) -> None:
    """The command line of align/train_reward_model.py and align/train_offline.py."""
    parser = training_arg_parser(description)
    if not reward:
        parser.add_argument("--merge_and_save", action="store_true",
                            help="LoRA/QLoRA: also write checkpoints/final with the adapters merged into the weights")
    args = parser.parse_args()
    cfg = load_config(args.config_path, AlignConfig, flag_overrides(args))
    if getattr(args, "merge_and_save", False):
        if weight_method(cfg) == "full":
            raise UserError("--merge_and_save merges LoRA/QLoRA adapters; this config trains full weights "
                            "(no `lora:` or `qlora:` section), so its final checkpoint is already plain weights")
        cfg.lora = cfg.lora or LoraSection()
        cfg.lora.merge_and_save = True
    if args.print_config:
        prepare(cfg, reward)
        print(to_yaml(cfg), end="")
        return
    train(cfg, reward, resume=args.resume)
