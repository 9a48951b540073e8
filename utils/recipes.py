"""The classic-model recipe suite as data: which architectures, which stages, and the settings
each size trains with. `utils/setup_classic_models.py` writes them out as YAML.

A recipe is ``<family>/<model>_<size>`` (e.g. ``deepseek/v3_nano``): the architecture comes from
`model.presets.CLASSIC`; each stage's config starts from the toolkit's own stage config
(``configs/pretrain/tiny.yaml``, ``configs/sft/*.yaml``, ``configs/align/*.yaml``,
``configs/eval/default.yaml``, so a recipe never drifts from what those stages accept), then
takes the size's settings and the recipe's stable paths:

    runs/classic/<family>/<model>_<size>/<stage>/checkpoints/final

Every stage continues from an earlier stage's ``final``; the config's ``recipe.needs`` names that
path and the command that writes it, so a stage run too early exits 2 naming the command.

The chain: 0_pretrain → 1_sft_{full,lora,qlora} (LoRA / QLoRA merge their adapters into
``final``) → 2_reward_model and 3_rlhf_* (all from the QLoRA SFT's merged ``final``) → 4_eval
(of 3_rlhf_grpo, the quick start's last training stage).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Optional

from model.presets import CLASSIC, CLASSIC_SIZES


@dataclass(frozen=True)
class Architecture:
    key: str  # in model.presets.CLASSIC
    prefix: str  # the size directory is <prefix>_<size>
    title: str
    paper: str
    published: str  # the full size's published model (Hugging Face id)


FAMILIES: dict[str, list[Architecture]] = {
    "deepseek": [Architecture("deepseek_v3", "v3", "DeepSeek-V3", "DeepSeek-AI, DeepSeek-V3 Technical Report (2024)",
                              "deepseek-ai/DeepSeek-V3")],
    "llama": [Architecture("llama3", "llama3", "Llama 3", "Grattafiori et al., The Llama 3 Herd of Models (2024)",
                           "meta-llama/Llama-3.1-8B")],
    "gemma": [Architecture("gemma2", "gemma2", "Gemma 2", "Gemma Team, Gemma 2 (2024)", "google/gemma-2-2b"),
              Architecture("gemma3", "gemma3", "Gemma 3", "Gemma Team, Gemma 3 Technical Report (2025)",
                           "google/gemma-3-1b-pt")],
    "qwen3": [Architecture("qwen3", "qwen3", "Qwen3", "Qwen Team, Qwen3 Technical Report (2025)", "Qwen/Qwen3-0.6B")],
    "mistral": [Architecture("mistral", "mistral", "Mistral 7B", "Jiang et al., Mistral 7B (2023)",
                             "mistralai/Mistral-7B-v0.1")],
}
SIZES = CLASSIC_SIZES


@dataclass(frozen=True)
class Stage:
    name: str  # file stem, e.g. 3_rlhf_grpo
    script: str
    template: str  # the toolkit's own config this stage starts from
    kind: str  # pretrain | sft | align | rl | eval (which size settings apply)
    after: Optional[str]  # the stage whose final it continues from
    what: str  # one line for the header


# The quick start's data pipeline as argument lists, offline (built-in sources), for the tests and
# benchmarks that build the data a recipe reads; add ``--data_dir DIR`` to each.
DATA_COMMANDS: list[list[str]] = [
    ["data_pipeline/download/download_tinystories.py", "--source", "builtin"],
    ["data_pipeline/tokenizer/train_tokenizer.py", "--vocab_size", "4096", "--data_limit_mb", "100"],
    ["data_pipeline/processing/encode_stories.py"],
    ["data_pipeline/processing/build_pretrain_bins.py"],
    ["data_pipeline/processing/build_sft_bins.py"],
    ["data_pipeline/processing/build_preference_bins.py"],
    ["data_pipeline/download/download_prompts.py", "--source", "builtin"],
]

SFT_FROM = "1_sft_qlora"  # what reward model, preference and RL stages continue from
STAGES: list[Stage] = [
    Stage("0_pretrain", "pretrain/train.py", "configs/pretrain/tiny.yaml", "pretrain", None,
          "pretraining from scratch on the packed token bins (next-token loss)"),
    Stage("1_sft_full", "finetune/sft_train.py", "configs/sft/full.yaml", "sft", "0_pretrain",
          "supervised fine-tuning of every parameter on the chat data (assistant tokens only)"),
    Stage("1_sft_lora", "finetune/peft/lora/sft_lora_train.py", "configs/sft/lora.yaml", "sft", "0_pretrain",
          "LoRA fine-tuning (Hu et al. 2021); final = the adapters merged into the base"),
    Stage("1_sft_qlora", "finetune/peft/qlora/sft_qlora_train.py", "configs/sft/qlora.yaml", "sft", "0_pretrain",
          "QLoRA fine-tuning (Dettmers et al. 2023): LoRA on the 4-bit NF4 base; final = the adapters merged into "
          "the dequantised base, which the later stages continue from"),
    Stage("2_reward_model", "align/train_reward_model.py", "configs/align/reward_model.yaml", "align", SFT_FROM,
          "a Bradley-Terry reward model on the preference pairs"),
    Stage("3_rlhf_dpo", "align/train_offline.py", "configs/align/dpo.yaml", "align", SFT_FROM,
          "DPO (Rafailov et al. 2023) on the preference pairs"),
    Stage("3_rlhf_orpo", "align/train_offline.py", "configs/align/orpo.yaml", "align", SFT_FROM,
          "ORPO (Hong et al. 2024): odds-ratio preference term + NLL, no reference model"),
    Stage("3_rlhf_kto", "align/train_offline.py", "configs/align/kto.yaml", "align", SFT_FROM,
          "KTO (Ethayarajh et al. 2024) on the pairs taken apart as desirable / undesirable examples"),
    Stage("3_rlhf_simpo", "align/train_offline.py", "configs/align/simpo.yaml", "align", SFT_FROM,
          "SimPO (Meng et al. 2024): length-normalised margin, no reference model"),
    Stage("3_rlhf_ppo", "align/train_online.py", "configs/align/ppo.yaml", "rl", SFT_FROM,
          "PPO (InstructGPT style) with a value head and GAE, rewarded by the verifier"),
    Stage("3_rlhf_grpo", "align/train_online.py", "configs/align/grpo.yaml", "rl", SFT_FROM,
          "GRPO (Shao et al. 2024) on verifiable problems, rollouts through the paged engine"),
    Stage("3_rlhf_gspo", "align/train_online.py", "configs/align/gspo.yaml", "rl", SFT_FROM,
          "GSPO (Zheng et al. 2025): sequence-level importance ratios"),
    Stage("3_rlhf_rft", "align/train_online.py", "configs/align/rft.yaml", "rl", SFT_FROM,
          "rejection-sampling fine-tuning: keep the verified-correct samples, SFT on them"),
    Stage("4_eval", "eval/run_eval.py", "configs/eval/default.yaml", "eval", "3_rlhf_grpo",
          "evaluation (lm-evaluation-harness conventions) of the GRPO model"),
]
STAGE_NAMES = [s.name for s in STAGES]


@dataclass
class SizeSettings:
    """What one size trains with, per stage kind (dotted keys, applied over the template)."""

    title: str
    common: dict[str, Any] = field(default_factory=dict)  # every training stage
    per_kind: dict[str, dict[str, Any]] = field(default_factory=dict)
    per_stage: dict[str, dict[str, Any]] = field(default_factory=dict)
    adapters_for_rl: bool = False  # 2_/3_ stages train QLoRA adapters on the 4-bit SFT model


_NANO_TRAIN = {"training.device": "auto", "training.dtype": "auto", "checkpointing.keep_last": 1}
SIZE_SETTINGS: dict[str, SizeSettings] = {
    "nano": SizeSettings(
        "nano: minutes on 2 CPU cores (the toolkit's 4096-token tokenizer; pretraining on 256-token windows, "
        "fine-tuning at 512)",
        common=_NANO_TRAIN,
        per_kind={
            "pretrain": {"data.seq_len": 256, "training.batch_size": 8, "training.max_steps": 300, "training.learning_rate": 3.0e-3,
                         "training.warmup_steps": 20, "training.eval_interval": 100, "training.eval_steps": 4,
                         "logging.log_interval": 20, "logging.sample_interval": 150,
                         "checkpointing.save_interval": 150},
            "sft": {"data.seq_len": 512, "training.batch_size": 8, "training.max_steps": 60,
                    "training.warmup_steps": 6, "training.eval_interval": 30, "training.eval_steps": 4,
                    "logging.log_interval": 10, "logging.sample_interval": 60, "checkpointing.save_interval": 30},
            "align": {"training.max_steps": 60, "training.eval_interval": 30, "training.eval_steps": 4,
                      "logging.log_interval": 10, "checkpointing.save_interval": 30},
            "rl": {"training.max_steps": 20, "training.eval_interval": 10, "rl.val_prompts": 32,
                   "rl.prompts_per_step": 8, "logging.log_interval": 5, "checkpointing.save_interval": 10},
            "eval": {"eval.tasks": ["ppl", "gsm8k", "mmlu"], "eval.limit": 10, "eval.batch_size": 16,
                     "eval.max_gen_toks": 64},
        },
        per_stage={"3_rlhf_rft": {"training.learning_rate": 2.0e-5},
                   # a nano SFT model rarely solves a problem yet: DAPO's refill of all-equal groups would
                   # resample step after step (16 s a step instead of ~4 on 2 cores)
                   "3_rlhf_grpo": {"rl.dynamic_sampling": False}},
    ),
    "small": SizeSettings(
        "small: ~100-150 M parameters for one GPU (bf16; sequences of 1024)",
        common={"training.device": "auto", "training.dtype": "auto", "checkpointing.keep_last": 2},
        per_kind={
            "pretrain": {"training.batch_size": 32, "training.max_steps": 20000, "training.learning_rate": 6.0e-4,
                         "training.warmup_steps": 500, "training.eval_interval": 500, "training.eval_steps": 20,
                         "logging.log_interval": 50, "logging.sample_interval": 1000,
                         "checkpointing.save_interval": 1000},
            "sft": {"data.seq_len": 1024, "training.batch_size": 16, "training.max_steps": 2000,
                    "training.warmup_steps": 50, "training.eval_interval": 200, "training.eval_steps": 20,
                    "logging.log_interval": 20, "logging.sample_interval": 500, "checkpointing.save_interval": 500},
            "align": {"training.max_steps": 1000, "training.eval_interval": 100, "training.eval_steps": 20,
                      "logging.log_interval": 10, "checkpointing.save_interval": 250},
            "rl": {"training.max_steps": 500, "training.eval_interval": 50, "logging.log_interval": 5,
                   "checkpointing.save_interval": 100},
            "eval": {"eval.tasks": ["ppl", "gsm8k", "mmlu", "humaneval"], "eval.limit": None,
                     "eval.batch_size": 32},
        },
        per_stage={"1_sft_full": {"training.learning_rate": 5.0e-5}},
    ),
    "full": SizeSettings(
        "full: the published architecture (a cluster: torchrun with FSDP2; bring the model's own tokenizer "
        "with data.tokenizer_dir, or start the SFT stages from the published weights)",
        common={"training.device": "auto", "training.dtype": "auto", "checkpointing.keep_last": 2,
                "training.parallelism": "fsdp", "training.activation_checkpointing": True},
        per_kind={
            "pretrain": {"data.seq_len": 4096, "training.batch_size": 1, "training.grad_accum_steps": 16,
                         "training.max_steps": 100000, "training.learning_rate": 2.2e-4,
                         "training.warmup_steps": 2000, "training.eval_interval": 1000, "training.eval_steps": 20,
                         "logging.log_interval": 10, "logging.sample_interval": 0,
                         "checkpointing.save_interval": 1000},
            "sft": {"data.seq_len": 4096, "training.batch_size": 1, "training.grad_accum_steps": 16,
                    "training.max_steps": 2000, "training.learning_rate": 1.0e-5, "training.warmup_steps": 50,
                    "training.eval_interval": 200, "training.eval_steps": 20, "logging.log_interval": 10,
                    "logging.sample_interval": 0, "checkpointing.save_interval": 500},
            "align": {"training.batch_size": 1, "training.grad_accum_steps": 16, "training.max_steps": 1000,
                      "training.learning_rate": 5.0e-7, "training.eval_interval": 100, "training.eval_steps": 20,
                      "logging.log_interval": 10, "checkpointing.save_interval": 250},
            "rl": {"training.max_steps": 500, "training.learning_rate": 1.0e-6, "training.eval_interval": 50,
                   "logging.log_interval": 1, "checkpointing.save_interval": 50},
            "eval": {"eval.tasks": ["ppl", "gsm8k", "mmlu", "humaneval"], "eval.limit": None,
                     "eval.batch_size": 8},
        },
        per_stage={"1_sft_lora": {"training.learning_rate": 2.0e-4},
                   "1_sft_qlora": {"training.learning_rate": 2.0e-4, "training.activation_checkpointing": False}},
        adapters_for_rl=True,
    ),
}


def recipe_dir(family: str, arch: Architecture, size: str) -> str:
    """``<family>/<prefix>_<size>``, the recipe's name (and its directory under the configs and runs)."""
    return f"{family}/{arch.prefix}_{size}"


def run_dir(runs_root: str, recipe: str, stage: str) -> str:
    return f"{runs_root}/{recipe}/{stage}"


def final_path(runs_root: str, recipe: str, stage: str) -> str:
    return f"{run_dir(runs_root, recipe, stage)}/checkpoints/final"


def stage_command(stage: Stage, config_path: str) -> str:
    return f"python {stage.script} --config_path {config_path}"


def set_dotted(d: dict[str, Any], key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    for p in parents:
        d = d.setdefault(p, {})
    d[leaf] = value


def stage_config(template: dict[str, Any], stage: Stage, arch: Architecture, size: str, recipe: str,
                 configs_root: str, runs_root: str, data_dir: str = "data") -> dict[str, Any]:
    """The config dict of one stage of one recipe (the template with the size's settings and paths)."""
    cfg = copy.deepcopy(template)
    settings = SIZE_SETTINGS[size]
    if stage.kind == "pretrain":
        cfg["model"] = dict(CLASSIC[arch.key][size])
    elif stage.kind != "eval":
        cfg.pop("model", None)  # the architecture (and context length) come from the stage it continues from
    needs = []
    if stage.after is not None:
        prev = next(s for s in STAGES if s.name == stage.after)
        needs.append({"path": final_path(runs_root, recipe, prev.name),
                      "run": stage_command(prev, f"{configs_root}/{recipe}/{prev.name}.yaml")})
    cfg = {"stage": cfg.pop("stage"), "recipe": {"name": recipe, "stage": stage.name, "needs": needs}, **cfg}
    overrides: dict[str, Any] = {}
    if stage.kind != "eval":
        overrides.update(settings.common)
        overrides["logging.run_dir"] = run_dir(runs_root, recipe, stage.name)
        overrides["logging.run_name"] = stage.name
        overrides["data.data_dir"] = data_dir
    overrides.update(settings.per_kind.get(stage.kind, {}))
    overrides.update(settings.per_stage.get(stage.name, {}))
    if stage.after is not None and stage.kind != "eval":
        overrides["checkpointing.init_from"] = needs[0]["path"]
    if stage.name in ("1_sft_lora", "1_sft_qlora"):
        overrides["lora.merge_and_save"] = True  # a self-contained final the next stages (and chat) load alone
    if stage.kind in ("align", "rl") and settings.adapters_for_rl and stage.name != "2_reward_model":
        cfg["lora"] = {"r": 16, "alpha": 32.0, "dropout": 0.0, "target_modules": "auto", "merge_and_save": True}
        cfg["qlora"] = {"backend": "auto", "double_quant": True}
    if stage.kind == "eval":
        overrides["model.checkpoint"] = needs[0]["path"]
        overrides["output.out"] = run_dir(runs_root, recipe, stage.name)
    for key, value in overrides.items():
        set_dotted(cfg, key, value)
    return cfg
