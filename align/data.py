"""The collators of the alignment stages: preference pairs as paired batches, or as KTO examples.

Both read the preference bins (``<data_dir>/preference/{train,val}``, written by
`data_pipeline/processing/build_preference_bins.py`: prompt / chosen / rejected token ids per
pair) with the batching of `data_pipeline.loader` (deterministic epochs, global batches
sharded by rank, exact resume).

* Paired methods (reward model, DPO, ORPO, SimPO) use `PreferenceLoader` as it is: per pair,
  ``prompt + chosen`` and ``prompt + rejected``, right-padded to one length.
* KTO (Ethayarajh et al. 2024) learns from unpaired examples, so `KTOLoader` turns each pair
  into two: ``(prompt, chosen)`` desirable and ``(prompt, rejected)`` undesirable — balanced by
  construction. KTO's reference point z0 is estimated from *mismatched* pairs (prompt x with
  a completion y' written for another prompt, §4.1): here pair i's prompt with the same-side
  completion of pair ``(i + 1) mod N`` of the bin. A fixed partner (TRL rotates completions
  within each batch instead) makes the estimate independent of how batches are sharded, so
  1 and N processes compute the same z0, and its reference log-probs can be precomputed.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional

import numpy as np
import torch

from data_pipeline.chat_loaders import PreferenceLoader, pad_prompt_responses
from data_pipeline.formats import COMMANDS, bin_base
from trainer.losses import Batch
from utils.config import ExperimentConfig
from utils.errors import UserError


class KTOLoader(PreferenceLoader):
    """Each pair → a desirable and an undesirable example, plus their mismatched KL sequences.

    Batch (int64; B pairs → 2B examples, the B desirable ones first): input_ids, labels,
    attention_mask (2B, T); kl_input_ids, kl_labels (2B, T) — example k's prompt with the
    partner pair's completion of the same side; desirable (2B,) 1/0; pair_ids (B,).
    """

    def _batch(self, units: np.ndarray) -> dict[str, torch.Tensor]:
        n = len(self.bin)
        pairs = [self.pair(i) for i in units]
        partners = [self.pair((int(i) + 1) % n) for i in units]
        rows = [(p[0], p[1]) for p in pairs] + [(p[0], p[2]) for p in pairs]
        kl_rows = [(p[0], q[1]) for p, q in zip(pairs, partners)] + [(p[0], q[2]) for p, q in zip(pairs, partners)]
        t = self.seq_len or max(len(a) + len(b) for a, b in rows + kl_rows)
        main, kl = pad_prompt_responses(rows, self.pad_id, t), pad_prompt_responses(kl_rows, self.pad_id, t)
        b = len(pairs)
        out = {"input_ids": main["input_ids"], "labels": main["labels"], "attention_mask": main["attention_mask"],
               "kl_input_ids": kl["input_ids"], "kl_labels": kl["labels"],
               "desirable": np.concatenate([np.ones(b, np.int64), np.zeros(b, np.int64)]),
               "pair_ids": np.asarray(units, dtype=np.int64)}
        return {k: torch.from_numpy(v) for k, v in out.items()}


def preference_bins(cfg: ExperimentConfig) -> tuple[Path, Path]:
    """Train / val bin base paths: ``data.train_bin`` / ``data.val_bin``, else ``<data_dir>/preference/``."""
    root = cfg.data.data_dir / "preference"
    return bin_base(cfg.data.train_bin or root / "train.bin"), bin_base(cfg.data.val_bin or root / "val.bin")


def check_bins_exist(cfg: ExperimentConfig) -> None:
    for base in preference_bins(cfg):
        if not base.with_suffix(".bin").is_file():
            raise UserError(f"preference bins not found: {base}.bin; build them with `{COMMANDS['preference']}` "
                            f"(--data_dir {cfg.data.data_dir})")


def build_preference_loaders(cfg: ExperimentConfig, rank: int, world_size: int, tok_hash: Optional[str],
                             kto: bool = False) -> tuple[PreferenceLoader, Callable[[], Iterable[Batch]], PreferenceLoader]:
    """The training loader, a factory for the (identical at every call) validation batches, and
    the validation loader itself. Rows are as long as the longest sequence of each batch
    (``data.seq_len`` fixes it, e.g. for torch.compile)."""
    check_bins_exist(cfg)
    cls = KTOLoader if kto else PreferenceLoader
    train_base, val_base = preference_bins(cfg)
    common = dict(batch_size=cfg.training.batch_size, rank=rank, world_size=world_size, seed=cfg.training.seed,
                  seq_len=cfg.data.seq_len, vocab_size=cfg.model.vocab_size, tokenizer_hash=tok_hash)
    train = cls(train_base, shuffle=True, **common)
    val = cls(val_base, shuffle=False, **common)
    longest = max(train.longest, val.longest)
    if longest > cfg.model.max_seq_len:
        raise UserError(f"the preference bins hold pairs of up to {longest} tokens, more than model.max_seq_len="
                        f"{cfg.model.max_seq_len}: rebuild them with `{COMMANDS['preference']} --max_seq_len "
                        f"{cfg.model.max_seq_len}`")
    if len(val.bin) < world_size:
        raise UserError(f"{val_base}.bin has {len(val.bin)} pairs, fewer than the {world_size} processes that "
                        f"validate: hold out more pairs (`{COMMANDS['preference']} --val_fraction ...`)")
    batch_size = cfg.training.batch_size

    def val_batches() -> Iterator[Batch]:
        return balanced_batches(val, rank, world_size, batch_size)

    return train, val_batches, val


def balanced_batches(loader: PreferenceLoader, rank: int, world_size: int, batch_size: int) -> Iterator[Batch]:
    """Every pair of a bin exactly once, in index order (validation drops no pair to fill whole
    batches; precomputing reference log-probs needs them all): this rank's share (pairs rank,
    rank + W, ...) in the same number of batches on every rank — so FSDP2's per-forward
    collectives line up — each of at most `batch_size` pairs (a little more only when
    batch_size is 1 and the shares are uneven)."""
    n = len(loader.bin)
    ids = np.arange(rank, n, world_size)
    largest, smallest = -(-n // world_size), n // world_size  # pairs per rank
    k = min(-(-largest // batch_size), smallest)  # batches per rank: ceil(largest / B), each non-empty
    for chunk in np.array_split(ids, k):
        yield loader._batch(chunk)


def describe_bins(loader: PreferenceLoader) -> dict[str, Any]:
    """What identifies a bin's content (for the precomputed reference's fingerprint)."""
    side = loader.bin.sidecar
    return {"num_pairs": len(loader.bin), "num_tokens": side.num_tokens, "tokenizer_hash": side.tokenizer_hash}
