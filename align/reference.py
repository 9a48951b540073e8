"""Where DPO's and KTO's reference log-probs come from: three kinds, one interface.

A reference is a callable ``batch -> (B, k)`` tensor of the reference model's summed response
log-probs, per pair: DPO ``[chosen, rejected]``; KTO ``[chosen, rejected, kl_chosen,
kl_rejected]`` (the last two for the mismatched rows that estimate z0). All three compute
them with the same functions as the policy (`reference_columns`), in eval mode, without
gradients:

* ``frozen``: a second, frozen copy of the starting model (memory: two models).
* ``precompute``: the starting model's log-probs for every pair of the train and validation
  bins, computed once before training and stored beside the run
  (``reference_logps.safetensors`` + a JSON fingerprint of the bins and the base), then
  looked up by ``pair_ids``. No second model stays in memory, and a resumed run reads the
  stored values back, so resuming is exact. Under torchrun each rank computes a share.
* ``adapters_off``: with LoRA / QLoRA the starting model *is* the policy with its adapters
  switched off (`model.lora.disable_adapters`), so no copy at all.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from align.data import balanced_batches, describe_bins
from align.objectives import kto_logps, pair_logps
from data_pipeline.chat_loaders import PreferenceLoader
from model.lora import disable_adapters
from trainer.checkpointing import gather_objects
from trainer.distributed import barrier, unwrap
from trainer.evaluation import to_device
from trainer.losses import Batch
from utils.errors import UserError

logger = logging.getLogger(__name__)
TABLE_FILE = "reference_logps.safetensors"
FINGERPRINT_FILE = "reference_logps.json"


@torch.no_grad()
def reference_columns(model: nn.Module, batch: Batch, kto: bool) -> Tensor:
    """The reference log-probs of a batch (B, 2) or, for KTO, (B, 4); fp32, in eval mode."""
    was_training = model.training
    model.eval()
    try:
        if kto:
            main, kl = kto_logps(model, batch), kto_logps(model, batch, kl=True)  # (2B,) each
            b = main.shape[0] // 2
            return torch.stack([main[:b], main[b:], kl[:b], kl[b:]], dim=1).float()
        pol = pair_logps(model, batch)
        return torch.stack([pol.chosen, pol.rejected], dim=1).float()
    finally:
        model.train(was_training)


class ModelReference:
    """``frozen`` (a separate model) or ``adapters_off`` (the policy's own base)."""

    def __init__(self, model: nn.Module, kto: bool, amp: Callable, adapters_off: bool = False) -> None:
        self.model, self.kto, self.amp, self.adapters_off = model, kto, amp, adapters_off

    def __call__(self, batch: Batch) -> Tensor:
        base = unwrap(self.model)  # the plain module: no DDP hooks, no compile guards
        with self.amp():
            if self.adapters_off:
                with disable_adapters(base):
                    return reference_columns(base, batch, self.kto)
            return reference_columns(base, batch, self.kto)


class PrecomputedReference:
    """Looks the stored reference log-probs up by ``pair_ids``: one table, the train pairs'
    rows first, then the validation pairs' (whose batches carry ``pair_ids + n_train``)."""

    def __init__(self, train: Tensor, val: Tensor) -> None:
        self.table = torch.cat([train, val])
        self.val_offset = train.shape[0]

    def __call__(self, batch: Batch) -> Tensor:
        return self.table[batch["pair_ids"].cpu()].to(batch["pair_ids"].device)

    def val_batches(self, batches: Callable[[], Any]) -> Callable[[], Any]:
        """Wrap the validation batches so their ``pair_ids`` point at the validation rows."""
        def shifted():
            for b in batches():
                yield {**b, "pair_ids": b["pair_ids"] + self.val_offset}
        return shifted


def compute_table(model: nn.Module, loader: PreferenceLoader, kto: bool, batch_size: int, rank: int,
                  world_size: int, device: torch.device, amp: Callable, adapters_off: bool) -> Tensor:
    """Reference log-probs of every pair of `loader`'s bin (N, k) fp32 on the CPU; each rank
    computes the pairs rank, rank + W, ... and the shares are gathered."""
    ref = ModelReference(model, kto, amp, adapters_off)
    rows: list[Tensor] = []
    for batch in balanced_batches(loader, rank, world_size, batch_size):
        rows.append(ref(to_device(batch, device)).cpu())
    mine = torch.cat(rows) if rows else torch.zeros(0, 4 if kto else 2)
    shares = gather_objects(mine)
    table = torch.zeros(len(loader.bin), mine.shape[1])
    for r, share in enumerate(shares):
        table[r::world_size] = share
    return table


def load_or_compute(run_root: Path, fingerprint: dict[str, Any], compute: Callable[[], dict[str, Tensor]],
                    is_main: bool) -> dict[str, Tensor]:
    """The run's stored tables when their fingerprint matches, else `compute()` (every rank
    takes part), written atomically by rank 0 and read back by all."""
    table_path, fp_path = run_root / TABLE_FILE, run_root / FINGERPRINT_FILE
    if table_path.is_file() and fp_path.is_file():
        stored = json.loads(fp_path.read_text())
        if stored != fingerprint:
            diff = sorted(k for k in set(stored) | set(fingerprint) if stored.get(k) != fingerprint.get(k))
            raise UserError(f"{table_path} was computed for other inputs ({', '.join(diff)} differ): start a new "
                            "run (logging.run_name) or delete the file to recompute it")
        logger.info("reference log-probs: read from %s", table_path)
        return load_file(str(table_path))
    logger.info("reference log-probs: computing them once for every train and validation pair ...")
    tables = compute()
    if is_main:
        tmp = table_path.with_name(f".{table_path.name}.tmp")
        save_file({k: v.contiguous() for k, v in tables.items()}, str(tmp))
        os.replace(tmp, table_path)
        fp_path.write_text(json.dumps(fingerprint, indent=2))
        logger.info("reference log-probs: stored in %s (%s)", table_path,
                    ", ".join(f"{k}: {tuple(v.shape)}" for k, v in tables.items()))
    barrier()
    return load_file(str(table_path))


def table_fingerprint(kto: bool, base: str, train: PreferenceLoader, val: PreferenceLoader,
                      model_config: dict) -> dict[str, Any]:
    return {"columns": ["chosen", "rejected", "kl_chosen", "kl_rejected"] if kto else ["chosen", "rejected"],
            "base_model": base, "model": model_config, "train": describe_bins(train), "val": describe_bins(val)}
