"""Typed config of the supervised fine-tuning stage, and how the base model's config merges
with the YAML ``model:`` section.

`SFTConfig` is the experiment config (`utils.config.ExperimentConfig`) plus three sections,
strict like the rest (unknown key, wrong type or impossible combination → exit 2, one line):

    sft:      packing                      how samples fill the rows (packed / one per row)
    lora:     r, alpha, dropout, target_modules | target_regex, merge_and_save
              (LoRA, Hu et al. 2021 — the fields of `model.lora.LoraConfig`)
    qlora:    backend, blocksize, double_quant, quantize_head, skip_modules, optimizer
              (QLoRA, Dettmers et al. 2023: the frozen base in 4-bit NF4)

The base model is ``checkpointing.init_from`` (required): one of our checkpoint directories or
a Hugging Face model directory. Its architecture comes from the base, never from the YAML:

* The base's config wins. The ``model:`` section may only *override* the fields of
  `MODEL_OVERRIDES` — ``max_seq_len``, ``rope_scaling`` (context extension) and ``dropout``.
* Any other field written in ``model:`` (or ``--set model.X=...``) must equal the base's
  value; a conflicting one is an error naming both values. Fields not written are taken from
  the base, so an SFT config needs no ``model:`` section at all.
* A ``rope_scaling`` override without ``original_max_position_embeddings`` gets the length
  the base was trained at (the base's own scaling's original length, else its
  ``max_seq_len``): YaRN, dynamic NTK and Llama-3 scaling measure the extension from there.

The resolved model config (after the merge) is what ``config.yaml`` and every checkpoint of the
run record, so a resumed run and inference see exactly the trained architecture.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from model.config import ModelConfig, RopeScaling
from model.lora import LoraConfig
from utils.config import ExperimentConfig, Section
from utils.errors import UserError

SFT_METHODS = ("full", "lora", "qlora")
MODEL_OVERRIDES = ("max_seq_len", "rope_scaling", "dropout")  # model fields an SFT config may change
NF4_BLOCKSIZES = (64, 128, 256, 512, 1024, 2048, 4096)  # the block sizes bitsandbytes' kernels accept


class SFTSection(Section):
    # True: several samples per row, with document masking and positions restarting per
    # sample (no attention across samples). False: one sample per row, padded.
    packing: bool = True


class LoraSection(LoraConfig):
    """`model.lora.LoraConfig` (r, alpha, dropout, target_modules: auto | [names], target_regex)
    plus what the stage does with the adapters."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, validate_default=True)

    # at the end, also write checkpoints/final as a plain checkpoint with the adapters merged
    # into the base weights (the --merge_and_save flag sets it)
    merge_and_save: bool = False


class QLoraSection(Section):
    backend: Literal["auto", "torch", "bnb"] = "auto"  # auto: bitsandbytes kernels on CUDA when installed
    blocksize: Literal[NF4_BLOCKSIZES] = 64  # weights per absmax block
    double_quant: bool = True  # quantise the block absmaxes too (QLoRA §3)
    quantize_head: bool = False  # the output head stays in the compute dtype unless true
    skip_modules: list[str] = Field(default_factory=list)  # more modules kept unquantised, e.g. ["layers.0"]
    # adamw: the engine's optimizer (training.optimizer); adamw8bit / paged_adamw8bit:
    # bitsandbytes' 8-bit AdamW (Dettmers et al. 2022), the paged one spilling to CPU memory
    optimizer: Literal["adamw", "adamw8bit", "paged_adamw8bit"] = "adamw"


class SFTConfig(ExperimentConfig):
    """The root config of an SFT run (full-parameter, LoRA or QLoRA: the script decides)."""

    stage: Literal["sft"] = "sft"
    sft: SFTSection = Field(default_factory=SFTSection)
    lora: Optional[LoraSection] = None  # LoRA and QLoRA scripts: None → defaults
    qlora: Optional[QLoraSection] = None  # QLoRA script only: None → defaults

    @model_validator(mode="after")
    def _check_sft(self) -> "SFTConfig":
        if self.checkpointing.init_from is None:
            raise ValueError("SFT starts from a trained model: set checkpointing.init_from to a checkpoint "
                             "directory (e.g. runs/pretrain/tiny/checkpoints/final) or a Hugging Face model directory")
        if self.data.doc_masking:
            raise ValueError("data.doc_masking is a pretraining option; SFT packing always masks across samples "
                             "(sft.packing)")
        if self.qlora is not None and self.qlora.optimizer != "adamw" and self.training.optimizer != "adamw":
            raise ValueError(f"qlora.optimizer={self.qlora.optimizer} replaces training.optimizer, which is "
                             f"{self.training.optimizer!r}: set training.optimizer to adamw")
        return self


def check_method_sections(cfg: SFTConfig, method: str) -> None:
    """Refuse sections the script does not use, and fill the ones it does with defaults, so
    the saved config.yaml states every adapter setting of the run."""
    if method not in SFT_METHODS:
        raise ValueError(f"SFT method must be one of {SFT_METHODS}, got {method!r}")
    scripts = {"lora": "finetune/peft/lora/sft_lora_train.py", "qlora": "finetune/peft/qlora/sft_qlora_train.py"}
    if method == "full" and (cfg.lora is not None or cfg.qlora is not None):
        section = "lora" if cfg.lora is not None else "qlora"
        raise UserError(f"the config has a `{section}:` section, which full-parameter SFT does not use: run "
                        f"{scripts[section]} for {section.upper()}, or remove the section")
    if method == "lora" and cfg.qlora is not None:
        raise UserError(f"the config has a `qlora:` section, which LoRA does not use: run {scripts['qlora']}")
    if method in ("lora", "qlora") and cfg.lora is None:
        cfg.lora = LoraSection()
    if method == "qlora" and cfg.qlora is None:
        cfg.qlora = QLoraSection()


# ---------------------------------------------------------------------------- model config merge
def _plain(value: Any) -> Any:
    return value.model_dump(mode="json") if isinstance(value, BaseModel) else value


def resolve_model_config(base: ModelConfig, requested: ModelConfig, source: Path | str) -> ModelConfig:
    """The run's model config: `base` with the YAML's overrides (see the module docstring).

    ``requested.model_fields_set`` tells the fields the YAML (or ``--set``) wrote; anything
    else is a default and never overrides the base.
    """
    merged = base.model_dump(mode="json")
    for name in sorted(requested.model_fields_set):
        value, have = _plain(getattr(requested, name)), merged.get(name)
        if name in MODEL_OVERRIDES:
            merged[name] = value
        elif value != have:
            allowed = ", ".join(f"model.{f}" for f in MODEL_OVERRIDES)
            raise UserError(f"model.{name}={value!r} conflicts with the base model's {have!r} ({source}): the "
                            f"architecture comes from checkpointing.init_from; only {allowed} may be overridden")
    scaling = merged.get("rope_scaling")
    overridden = "rope_scaling" in requested.model_fields_set
    if overridden and scaling and scaling.get("original_max_position_embeddings") is None:
        trained = base.rope_scaling.original_max_position_embeddings if base.rope_scaling else None
        scaling["original_max_position_embeddings"] = trained or base.max_seq_len
    try:
        return ModelConfig(**merged)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "model"
        raise UserError(f"model config after applying the overrides to the base model ({source}) is invalid: "
                        f"{where}: {err['msg']}") from None


def rope_scaling_summary(scaling: Optional[RopeScaling]) -> str:
    """One phrase for the log: "yarn x4 from 128" or "none"."""
    if scaling is None:
        return "none"
    origin = f" from {scaling.original_max_position_embeddings}" if scaling.original_max_position_embeddings else ""
    return f"{scaling.type} x{scaling.factor:g}{origin}"
