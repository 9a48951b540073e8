"""One generation request as the engine sees it: tokens, status, KV block table.

A `Sequence` is pure bookkeeping (no torch). The scheduler moves it between WAITING and
RUNNING and finally to FINISHED; the block manager fills its `block_table`; the model runner
reads `token_ids`, `num_computed_tokens` and `block_table` to know what to compute and where
the KV of each position lives (PagedAttention, Kwon et al., 2023).
"""
from __future__ import annotations

import enum
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # sampling.py imports torch; the bookkeeping only needs the attributes
    from inference.engine.sampling import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"  # queued (new, or preempted and waiting to be recomputed); owns no blocks
    RUNNING = "running"  # owns blocks and a state slot; is prefilled or decoded each step
    FINISHED = "finished"  # done (finish_reason says why); owns nothing


class Sequence:
    """A request: prompt + generated tokens and the engine state attached to them.

    Fields the model runner reads:
      token_ids            prompt followed by the generated tokens
      num_computed_tokens  positions [0, num_computed_tokens) already have KV in the cache
      block_table          block k holds the KV of positions [k * block_size, (k + 1) * block_size)
      slot                 0..max_num_seqs-1 while RUNNING (index of per-sequence recurrent state)
    """

    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        self.request_id = request_id
        self.params = params
        self.token_ids: list[int] = list(prompt_token_ids)
        self.num_prompt_tokens = len(self.token_ids)
        self.status = SequenceStatus.WAITING
        self.block_table: list[int] = []
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0  # prefix-cache hit at the last allocation (usage statistics)
        self.slot: int | None = None
        self.finish_reason: str | None = None  # "stop" | "length" | "abort"
        self.max_len = 0  # set by Scheduler.add: finish with "length" when len(seq) reaches it

    def __len__(self) -> int:
        return len(self.token_ids)

    def __repr__(self) -> str:
        return (
            f"Sequence({self.request_id!r}, {self.status.name}, len={len(self)}, "
            f"computed={self.num_computed_tokens}, blocks={self.block_table})"
        )

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_completion_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def last_token_id(self) -> int:
        return self.token_ids[-1]

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)
