"""What LoRA / QLoRA add to the SFT stage: which parameters train, their optimizer, and how
the adapters are saved.

* Only the adapter matrices train (`trainable_filter`). With ``qlora.optimizer`` set to
  ``adamw8bit`` / ``paged_adamw8bit`` they are optimised by bitsandbytes' 8-bit AdamW
  (Dettmers et al. 2022, "8-bit Optimizers via Block-wise Quantization"; QLoRA's paged
  optimizers), imported only then.
* `AdapterTrainer` is the engine's `Trainer` that also writes the adapters alone, in Hugging
  Face PEFT's layout (`model.lora_io.save_adapter`: ``adapter_model.safetensors`` +
  ``adapter_config.json``), into every checkpoint directory. The engine's own files stay
  beside them, so a run resumes exactly as any other.
* `export_final` rewrites ``checkpoints/final`` when training ends: the adapters alone (with
  the tokenizer and chat template), to load on top of the base
  (``inference/chat.py --checkpoint BASE --adapter .../final``); with ``lora.merge_and_save``
  also a plain checkpoint of merged weights that inference loads by itself. Merging starts
  from a fresh fp32 copy of the base (for QLoRA: quantised exactly as in training, then
  dequantised — the weights the adapters were trained against) and adds ``(alpha / r) B A``.
  When the run overrode the base's ``max_seq_len`` / ``rope_scaling`` (long-context SFT), the
  base's config no longer describes the trained model: ``final/meta.json`` records the
  overrides under ``adapter.model_overrides`` and the log recommends ``--merge_and_save``.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from finetune.base_model import BaseModelSource, build_sft_model
from finetune.config import SFTConfig
from model.lora import lora_parameters
from model.lora_io import adapter_state_dict, merged_state_dict, save_adapter
from trainer.engine import Trainer
from trainer.optim import build_optimizer, classify_params
from utils.checkpoint import atomic_replace_dir, copy_tokenizer_files, save_checkpoint
from utils.config import TrainingConfig
from utils.errors import UserError

logger = logging.getLogger(__name__)

BNB_OPTIMIZERS = {"adamw8bit": "AdamW8bit", "paged_adamw8bit": "PagedAdamW8bit"}


def trainable_filter(model: nn.Module) -> Callable[[str, nn.Parameter], bool]:
    """``(name, param) -> bool`` for the engine: true for the LoRA matrices only."""
    ids = {id(p) for p in lora_parameters(model)}
    return lambda name, p: id(p) in ids


def bnb_optimizer(model: nn.Module, tcfg: TrainingConfig, kind: str) -> torch.optim.Optimizer:
    """bitsandbytes' 8-bit AdamW over the trainable parameters, with the engine's groups
    (2-D matrices decay, 1-D parameters do not) and ``base_lr`` for the schedule."""
    try:
        import bitsandbytes.optim as bnb_optim  # lazy: importing bitsandbytes prints warnings
    except ImportError:
        raise UserError(f"qlora.optimizer={kind} needs the bitsandbytes package (pip install bitsandbytes)") from None
    parts = classify_params(model)
    groups = [dict(params=[p for _, p in params], lr=tcfg.learning_rate, base_lr=tcfg.learning_rate, weight_decay=wd)
              for params, wd in ((parts["hidden"] + parts["embed_head"], tcfg.weight_decay), (parts["no_decay"], 0.0))
              if params]
    cls = getattr(bnb_optim, BNB_OPTIMIZERS[kind])
    return cls(groups, lr=tcfg.learning_rate, betas=(tcfg.beta1, tcfg.beta2), eps=tcfg.eps)


def optimizer_factory(cfg: SFTConfig) -> Callable[[nn.Module], torch.optim.Optimizer]:
    """The engine's default optimizer, or an 8-bit one when ``qlora.optimizer`` asks for it."""
    kind = cfg.qlora.optimizer if cfg.qlora is not None else "adamw"
    if kind == "adamw":
        return lambda model: build_optimizer(model, cfg.training)
    return lambda model: bnb_optimizer(model, cfg.training, kind)


class AdapterTrainer(Trainer):
    """The engine's `Trainer`, also writing the adapters alone into each checkpoint."""

    def __init__(self, *args, base_model_path: str, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.base_model_path = base_model_path

    def save(self) -> Optional[Path]:
        path = super().save()
        if path is not None:  # rank 0
            save_adapter(self.base, path, base_model_path=self.base_model_path)
        return path


def export_final(trainer: Trainer, source: BaseModelSource, cfg: SFTConfig, method: str, final: Path,
                 tokenizer_dir: Path) -> Path:
    """Rewrite the engine's ``final`` checkpoint as adapters (+ merged weights), rank 0 only."""
    meta = json.loads((final / "meta.json").read_text()) if (final / "meta.json").is_file() else {}
    merge = cfg.lora.merge_and_save
    meta["adapter"] = {"method": method, "base_model": str(source.path), "merged": merge}
    if merge:
        weights = merged_weights(trainer.base, source, cfg, method)
        save_checkpoint(final, weights, cfg.model.model_dump(mode="json"), tokenizer_dir=tokenizer_dir, meta=meta)
        save_adapter(trainer.base, final, base_model_path=str(source.path))
        logger.info("final: merged weights + adapters in %s", final)
        return final
    base_cfg, run_cfg = source.config.model_dump(mode="json"), cfg.model.model_dump(mode="json")
    changed = {k: v for k, v in run_cfg.items() if v != base_cfg.get(k) and k != "dropout"}
    if changed:  # the base's own config.json no longer describes the trained model
        meta["adapter"]["model_overrides"] = changed
        logger.warning("this run changed %s from the base's config: load the adapters on a base with these values "
                       "(recorded in final/meta.json), or rerun with --merge_and_save for a self-contained checkpoint",
                       ", ".join(sorted(changed)))
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    save_adapter(trainer.base, tmp, base_model_path=str(source.path))
    copy_tokenizer_files(tokenizer_dir, tmp)
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    atomic_replace_dir(tmp, final)
    logger.info("final: adapters in %s (load on top of %s; --merge_and_save writes merged weights)", final, source.path)
    return final


@torch.no_grad()
def merged_weights(trained: nn.Module, source: BaseModelSource, cfg: SFTConfig, method: str) -> dict[str, torch.Tensor]:
    """Plain state dict (base names, fp32): a fresh copy of the base, built as for training,
    with the trained adapters folded in."""
    fresh = build_sft_model(source, cfg, method, torch.device("cpu"), torch.float32)
    target = adapter_state_dict(fresh)
    for name, t in adapter_state_dict(trained).items():
        target[name].copy_(t.detach().to("cpu", torch.float32))
    return merged_state_dict(fresh)
