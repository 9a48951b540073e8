"""Loaders for chat data: SFT rows (packed or padded) and preference pairs for DPO-style losses.

Both follow the batching scheme of `data_pipeline/loader.py` (deterministic epochs, global
batches sharded by rank, exact resume through `state_dict()` / `load_state_dict()`).

Labels use the shifted convention: labels[t] is the token the model must predict after seeing
input_ids[:t+1], or -100 where nothing is learned. So the loss is simply
`cross_entropy(logits.view(-1, V), labels.view(-1), ignore_index=-100)`.

Packing follows the "packing with document masking" recipe (e.g. Krell et al. 2021,
"Efficient Sequence Packing without Cross-contamination"): several samples share a row, and
per-token doc_ids plus position_ids restarting at 0 let attention keep them apart.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional

import numpy as np
import torch

from data_pipeline.formats import TokenBin
from data_pipeline.loader import IGNORE_INDEX, ShardedLoader
from utils.errors import UserError


def sample_labels(ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """labels[t] = ids[t+1] where token t+1 is a target, else -100; the last position is -100."""
    labels = np.full(len(ids), IGNORE_INDEX, dtype=np.int64)
    labels[:-1] = np.where(mask[1:] == 1, ids[1:], IGNORE_INDEX)
    return labels


def pack_greedy(lengths: np.ndarray, seq_len: int) -> np.ndarray:
    """Cut samples (taken in the given order) into rows of at most `seq_len` tokens.

    Returns (num_rows, 2) [start, end) ranges into the order: a row takes samples while they
    fit and is closed (the rest padded) when the next one does not.
    """
    rows, start, used = [], 0, 0
    for i, n in enumerate(lengths):
        if used + n > seq_len:
            rows.append((start, i))
            start, used = i, 0
        used += int(n)
    if len(lengths):
        rows.append((start, len(lengths)))
    return np.asarray(rows, dtype=np.int64).reshape(-1, 2)


class SFTLoader(ShardedLoader):
    """SFT rows of exactly `seq_len` tokens.

    mode="packed": samples (shuffled per epoch) are packed greedily into rows; mode="padded":
    one sample per row. Batch (all (B, T) int64): input_ids (padding = the pad token), labels
    (-100 on context, padding and sample ends), doc_ids (0, 1, ... per sample in the row, -1 on
    padding), position_ids (restarting at 0 per sample, 0 on padding), attention_mask (1 on
    real tokens). A sample longer than `seq_len` is refused: rebuild the bins with a smaller
    --max_seq_len rather than losing the <|im_end|> silently.
    """

    def __init__(self, base: Path, seq_len: int, batch_size: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, shuffle: bool = True, mode: Literal["packed", "padded"] = "packed",
                 vocab_size: Optional[int] = None, tokenizer_hash: Optional[str] = None) -> None:
        super().__init__(batch_size, rank, world_size, seed, shuffle)
        if mode not in ("packed", "padded"):
            raise UserError(f"SFT loader mode must be 'packed' or 'padded', got {mode!r}")
        self.bin = TokenBin(base, "sft", vocab_size=vocab_size, tokenizer_hash=tokenizer_hash)
        self.lengths = self.bin.item_lengths()
        longest = int(self.lengths.max()) if len(self.lengths) else 0
        if longest > seq_len:
            raise UserError(f"{base}.bin holds samples of up to {longest} tokens, more than seq_len "
                            f"{seq_len}: rebuild with `build_sft_bins.py --max_seq_len {seq_len}` or raise seq_len")
        self.seq_len = seq_len
        self.mode = mode
        self.pad_id = self.bin.sidecar.pad_id

    def _order(self, epoch: int) -> np.ndarray:
        n = len(self.bin)
        return self._rng(epoch).permutation(n) if self.shuffle else np.arange(n)

    def _plan(self, epoch: int) -> np.ndarray:
        order = self._order(epoch)
        if self.mode == "padded":
            return order[:, None]                                   # (num_rows, 1) sample ids
        ranges = pack_greedy(self.lengths[order], self.seq_len)     # (num_rows, 2)
        return _ragged_rows(order, ranges)                          # (num_rows, max_per_row)

    def _batch(self, units: np.ndarray) -> dict[str, torch.Tensor]:
        b, t = len(units), self.seq_len
        out = {
            "input_ids": np.full((b, t), self.pad_id, dtype=np.int64),
            "labels": np.full((b, t), IGNORE_INDEX, dtype=np.int64),
            "doc_ids": np.full((b, t), -1, dtype=np.int64),
            "position_ids": np.zeros((b, t), dtype=np.int64),
            "attention_mask": np.zeros((b, t), dtype=np.int64),
        }
        for r, row in enumerate(units):
            pos = 0
            for d, i in enumerate(s for s in row if s >= 0):
                a, e = self.bin.span(int(i))
                ids = np.asarray(self.bin.tokens[a:e], dtype=np.int64)
                n = len(ids)
                out["input_ids"][r, pos:pos + n] = ids
                out["labels"][r, pos:pos + n] = sample_labels(ids, self.bin.mask[a:e])
                out["doc_ids"][r, pos:pos + n] = d
                out["position_ids"][r, pos:pos + n] = np.arange(n)
                out["attention_mask"][r, pos:pos + n] = 1
                pos += n
        return {k: torch.from_numpy(v) for k, v in out.items()}

    def _fingerprint(self) -> dict[str, Any]:
        return {**self._base_fingerprint(), "seq_len": self.seq_len, "mode": self.mode,
                "num_items": len(self.bin), "tokenizer_hash": self.bin.sidecar.tokenizer_hash}


def _ragged_rows(order: np.ndarray, ranges: np.ndarray) -> np.ndarray:
    """Rows of sample ids as one (num_rows, max_per_row) array, -1 where a row has fewer."""
    width = int((ranges[:, 1] - ranges[:, 0]).max()) if len(ranges) else 1
    rows = np.full((len(ranges), width), -1, dtype=np.int64)
    for r, (a, b) in enumerate(ranges):
        rows[r, : b - a] = order[a:b]
    return rows


class PreferenceLoader(ShardedLoader):
    """Batches of preference pairs: (prompt + chosen, prompt + rejected), padded on the right.

    Batch (all int64): for side in (chosen, rejected): `{side}_input_ids` (B, T),
    `{side}_labels` (B, T) (-100 except where the next token is a response token),
    `{side}_loss_mask` (B, T) (1 where labels are a target) and `{side}_attention_mask` (B, T);
    plus prompt_lengths (B,) and pair_ids (B,) (the pairs' indices in the bin, e.g. to look up
    precomputed reference log-probs). Both sides share T (the longest sequence in the batch, or
    `seq_len` when given for fixed shapes) so they can be run as one concatenated batch.
    """

    def __init__(self, base: Path, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 shuffle: bool = True, seq_len: Optional[int] = None, vocab_size: Optional[int] = None,
                 tokenizer_hash: Optional[str] = None) -> None:
        super().__init__(batch_size, rank, world_size, seed, shuffle)
        self.bin = TokenBin(base, "preference", vocab_size=vocab_size, tokenizer_hash=tokenizer_hash)
        spans = np.diff(self.bin.offsets).reshape(-1, 3)                       # (N, 3) part lengths
        longest = int((spans[:, 0] + spans[:, 1:].max(axis=1)).max()) if len(spans) else 0
        if seq_len is not None and longest > seq_len:
            raise UserError(f"{base}.bin holds pairs of up to {longest} tokens, more than seq_len {seq_len}: "
                            f"rebuild with `build_preference_bins.py --max_seq_len {seq_len}` or raise seq_len")
        self.seq_len = seq_len
        self.longest = longest  # prompt + the longer reply, over all pairs
        self.pad_id = self.bin.sidecar.pad_id

    def _plan(self, epoch: int) -> np.ndarray:
        n = len(self.bin)
        return self._rng(epoch).permutation(n) if self.shuffle else np.arange(n)

    def pair(self, i: int) -> list[np.ndarray]:
        """Pair `i` as [prompt, chosen, rejected] token arrays (int64)."""
        return [np.asarray(self.bin.item(int(i), p), dtype=np.int64) for p in range(3)]

    def _batch(self, units: np.ndarray) -> dict[str, torch.Tensor]:
        pairs = [self.pair(i) for i in units]
        t = self.seq_len or max(len(pr) + max(len(c), len(r)) for pr, c, r in pairs)
        out: dict[str, np.ndarray] = {"prompt_lengths": np.array([len(p[0]) for p in pairs], dtype=np.int64),
                                      "pair_ids": np.asarray(units, dtype=np.int64)}
        for side, part in (("chosen", 1), ("rejected", 2)):
            rows = pad_prompt_responses([(p[0], p[part]) for p in pairs], self.pad_id, t)
            out.update({f"{side}_{k}": v for k, v in rows.items()})
        return {k: torch.from_numpy(v) for k, v in out.items()}

    def _fingerprint(self) -> dict[str, Any]:
        return {**self._base_fingerprint(), "num_items": len(self.bin),
                "tokenizer_hash": self.bin.sidecar.tokenizer_hash}


def pad_prompt_responses(rows: list[tuple[np.ndarray, np.ndarray]], pad_id: int, seq_len: int) -> dict[str, np.ndarray]:
    """(prompt, response) token arrays → right-padded (B, seq_len) int64 arrays: input_ids,
    labels (-100 except where the next token is a response token), loss_mask (labels are a
    target) and attention_mask (1 on real tokens)."""
    b = len(rows)
    ids = np.full((b, seq_len), pad_id, dtype=np.int64)
    labels = np.full((b, seq_len), IGNORE_INDEX, dtype=np.int64)
    attn = np.zeros((b, seq_len), dtype=np.int64)
    for r, (prompt, response) in enumerate(rows):
        seq = np.concatenate([prompt, response])
        mask = np.concatenate([np.zeros(len(prompt), np.int64), np.ones(len(response), np.int64)])
        ids[r, :len(seq)] = seq
        labels[r, :len(seq)] = sample_labels(seq, mask)
        attn[r, :len(seq)] = 1
    return {"input_ids": ids, "labels": labels, "loss_mask": (labels != IGNORE_INDEX).astype(np.int64),
            "attention_mask": attn}
