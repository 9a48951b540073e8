"""Training data loaders: pretraining windows, packed/padded SFT rows, preference pairs.

All three read token bins through `formats.TokenBin` (memory-mapped; the sidecar is checked
against the model's vocab size and, when given, the tokenizer hash) and share one batching
scheme, so the trainer drives them the same way:

* An epoch is a deterministic list of *units* (pretrain: windows; SFT: packed rows or single
  samples; preference: pairs), shuffled from (seed, epoch) alone.
* Global batch semantics: each step consumes one global batch of `batch_size * world_size`
  consecutive units; rank r takes units [r*batch_size, (r+1)*batch_size) of it. Ranks therefore
  see disjoint data, and every rank has the same number of steps per epoch (the incomplete
  last global batch is dropped; an epoch smaller than one global batch is passed over whole).
  With gradient accumulation every micro-step is one such step.
* `next(loader)` / `iter(loader)` run forever, epoch after epoch. `state_dict()` is the position
  (epoch, step) plus a fingerprint of what defines the order; `load_state_dict()` restores it,
  so a resumed run sees exactly the batches the uninterrupted run would have seen, even with
  another world size as long as the global batch size is the same.

Batches are dicts of int64 CPU tensors (moving them to the device is the trainer's job):
* `PretrainLoader`: input_ids (B, T), labels (B, T) = the next tokens; with
  `doc_masking=True` also doc_ids (B, T) (documents end at EOS) and position_ids (B, T)
  restarting at every document — for document masking as in Llama 3 pretraining.
* `SFTLoader` / `PreferenceLoader`: see their docstrings (`data_pipeline/chat_loaders.py`).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch

from data_pipeline.formats import TokenBin
from utils.errors import UserError

IGNORE_INDEX = -100  # labels that take no part in the loss (torch cross_entropy's ignore_index)
MAX_EMPTY_EPOCHS = 100  # consecutive epochs too small for one global batch before giving up


class ShardedLoader(ABC):
    """Base class: deterministic epochs of units, cut into global batches and sharded by rank.

    Subclasses define `_plan(epoch)` (the epoch's units, in order), `_batch(units)` and
    `_fingerprint()` (what must match for a saved position to mean the same batches).
    """

    def __init__(self, batch_size: int, rank: int, world_size: int, seed: int, shuffle: bool) -> None:
        if batch_size < 1:
            raise UserError(f"batch_size must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise UserError(f"rank {rank} is not in [0, world_size={world_size})")
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.step = 0  # the next step within the epoch
        self._plan_cache: tuple[int, Any] = (-1, None)

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.world_size

    def _rng(self, epoch: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, epoch])

    @abstractmethod
    def _plan(self, epoch: int) -> np.ndarray:
        """The epoch's units in visiting order, shape (num_units, ...)."""

    @abstractmethod
    def _batch(self, units: np.ndarray) -> dict[str, torch.Tensor]:
        """One rank's batch made of `batch_size` units."""

    @abstractmethod
    def _fingerprint(self) -> dict[str, Any]:
        """What must be equal for a saved (epoch, step) to mean the same batches."""

    def _epoch_plan(self, epoch: int) -> np.ndarray:
        if self._plan_cache[0] != epoch:
            self._plan_cache = (epoch, self._plan(epoch))
        return self._plan_cache[1]

    def steps_per_epoch(self, epoch: Optional[int] = None) -> int:
        """Steps in `epoch` (default: the current one)."""
        return len(self._epoch_plan(self.epoch if epoch is None else epoch)) // self.global_batch_size

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        return self._batch(self._advance())

    def _advance(self) -> np.ndarray:
        """Move to the next step (into the next epoch when this one is done) and return this
        rank's units of it. The step count is always that of the epoch the units come from:
        epochs differ in size (random window offsets, re-packing), and one holding less than a
        global batch is passed over whole (its units are the dropped remainder), so every
        rank takes the same steps and every batch is full."""
        empty = 0  # epochs passed over in a row
        while self.step >= self.steps_per_epoch():
            if self.steps_per_epoch() == 0:
                empty += 1
                if not self.shuffle or empty >= MAX_EMPTY_EPOCHS:  # unshuffled epochs never change
                    raise UserError(f"{type(self).__name__}: an epoch holds {len(self._epoch_plan(self.epoch))} "
                                    f"units, fewer than one global batch of {self.global_batch_size} "
                                    f"(batch_size {self.batch_size} x world_size {self.world_size})")
            self.epoch, self.step = self.epoch + 1, 0
        start = self.step * self.global_batch_size + self.rank * self.batch_size
        self.step += 1
        return self._epoch_plan(self.epoch)[start:start + self.batch_size]

    def state_dict(self) -> dict[str, Any]:
        """JSON-friendly position: the next batch is step `step` of epoch `epoch`."""
        return {"epoch": self.epoch, "step": self.step, **self._fingerprint()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        want = self._fingerprint()
        got = {k: state.get(k) for k in want}
        if got != want:
            diff = ", ".join(f"{k}: saved {got[k]!r} vs now {want[k]!r}" for k in want if got[k] != want[k])
            raise UserError(f"cannot resume the data position: the data or batching changed ({diff})")
        self.epoch, self.step = int(state["epoch"]), int(state["step"])

    def _base_fingerprint(self) -> dict[str, Any]:
        return {"loader": type(self).__name__, "seed": self.seed, "shuffle": self.shuffle,
                "global_batch_size": self.global_batch_size}


class Prefetcher:
    """Builds a `ShardedLoader`'s next batches in background threads (``data.num_workers``).

    The caller's thread still decides every position (`ShardedLoader._advance`, cheap), in
    order; `num_workers` threads run the expensive part, ``_batch(units)`` (memory-mapped reads,
    packing, document ids), keeping ``2 * num_workers`` batches in flight (PyTorch's default
    ``prefetch_factor``). Batches come out in order and are exactly the loader's own.
    `state_dict()` is the position after the last batch *handed out*, not after the last one
    built, so a checkpoint resumes exactly; `load_state_dict()` drops what was built ahead.
    Threads, not processes: ``_batch`` is numpy work that mostly releases the GIL, and the
    loader (a memory map) needs no pickling or shared memory. Other attributes are the loader's.
    """

    def __init__(self, loader: ShardedLoader, num_workers: int) -> None:
        if num_workers < 1:
            raise ValueError(f"a Prefetcher needs num_workers >= 1, got {num_workers}")
        self.loader = loader
        self.depth = 2 * num_workers
        self._pool = ThreadPoolExecutor(num_workers, thread_name_prefix="prefetch")
        self._pending: deque[tuple[Future, dict[str, Any]]] = deque()  # (batch, loader state after it)
        self._state = loader.state_dict()

    def __getattr__(self, name: str) -> Any:  # only called for names not found on the Prefetcher
        loader = self.__dict__.get("loader")
        if loader is None:
            raise AttributeError(name)
        return getattr(loader, name)

    def __iter__(self) -> "Prefetcher":
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        self._fill()
        future, self._state = self._pending.popleft()
        self._fill()  # keep `depth` batches building while the caller trains on this one
        return future.result()

    def _fill(self) -> None:
        while len(self._pending) < self.depth:
            units = self.loader._advance()
            self._pending.append((self._pool.submit(self.loader._batch, units), self.loader.state_dict()))

    def state_dict(self) -> dict[str, Any]:
        return dict(self._state)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loader.load_state_dict(state)
        for future, _ in self._pending:
            future.cancel()  # a batch already building just finishes unused
        self._pending.clear()
        self._state = self.loader.state_dict()

    def close(self) -> None:
        """Stop the threads (pending batches are dropped)."""
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._pending.clear()


def prefetching(data: Any, num_workers: int) -> Any:
    """`data` behind a `Prefetcher` when it is a `ShardedLoader` and `num_workers` > 0, else as is."""
    if num_workers > 0 and isinstance(data, ShardedLoader):
        return Prefetcher(data, num_workers)
    return data


class PretrainLoader(ShardedLoader):
    """Windows of `seq_len + 1` tokens from a flat pretraining bin.

    Each epoch cuts the stream into consecutive windows from a random offset in [0, seq_len)
    (so window edges move between epochs) and visits them in a random order: every token is
    seen once per epoch. With `shuffle=False` (validation) the offset is 0 and order is kept.
    """

    def __init__(self, base: Path, seq_len: int, batch_size: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, shuffle: bool = True, doc_masking: bool = False,
                 vocab_size: Optional[int] = None, tokenizer_hash: Optional[str] = None) -> None:
        super().__init__(batch_size, rank, world_size, seed, shuffle)
        self.bin = TokenBin(base, "pretrain", vocab_size=vocab_size, tokenizer_hash=tokenizer_hash)
        if seq_len < 1:
            raise UserError(f"seq_len must be >= 1, got {seq_len}")
        if self.bin.sidecar.num_tokens < seq_len + 1:
            raise UserError(f"{base}.bin holds {self.bin.sidecar.num_tokens} tokens, fewer than one "
                            f"window of seq_len + 1 = {seq_len + 1}")
        self.seq_len = seq_len
        self.doc_masking = doc_masking
        self.eos_id = self.bin.sidecar.eos_id

    def _plan(self, epoch: int) -> np.ndarray:
        rng = self._rng(epoch)
        n, t = self.bin.sidecar.num_tokens, self.seq_len
        offset = int(rng.integers(t)) if self.shuffle else 0
        starts = offset + np.arange((n - 1 - offset) // t, dtype=np.int64) * t  # window = [s, s + t]
        return rng.permutation(starts) if self.shuffle else starts

    def _batch(self, units: np.ndarray) -> dict[str, torch.Tensor]:
        t = self.seq_len
        rows = np.stack([self.bin.tokens[s:s + t + 1] for s in units]).astype(np.int64)  # (B, T+1)
        rows = torch.from_numpy(rows)
        batch = {"input_ids": rows[:, :-1], "labels": rows[:, 1:]}  # (B, T) each
        if self.doc_masking:
            batch.update(document_ids_and_positions(batch["input_ids"], self.eos_id))
        return batch

    def _fingerprint(self) -> dict[str, Any]:
        return {**self._base_fingerprint(), "seq_len": self.seq_len,
                "num_tokens": self.bin.sidecar.num_tokens, "tokenizer_hash": self.bin.sidecar.tokenizer_hash}


def document_ids_and_positions(input_ids: torch.Tensor, eos_id: int) -> dict[str, torch.Tensor]:
    """Per-token document ids and positions for rows of EOS-separated documents.

    A document ends with (and includes) its EOS; the next token starts a new document, whose
    position ids restart at 0. input_ids (B, T) → doc_ids (B, T), position_ids (B, T).
    """
    is_eos = (input_ids == eos_id).long()                      # (B, T)
    doc_ids = torch.cumsum(is_eos, dim=1) - is_eos             # EOS belongs to the doc it closes
    t = torch.arange(input_ids.shape[1]).expand_as(input_ids)  # (B, T)
    starts = torch.zeros_like(is_eos)
    starts[:, 1:] = is_eos[:, :-1]                             # 1 where a new document begins
    doc_start = torch.cummax(t * starts, dim=1).values         # index where each token's doc began
    return {"doc_ids": doc_ids, "position_ids": t - doc_start}
