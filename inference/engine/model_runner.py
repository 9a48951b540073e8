"""Runs the model over the paged KV cache for a batch of sequences (prefill or decode).

Each row of a batch computes a run of new tokens from some position on: a prefill its prompt
minus the prefix-cache hit, a decode step its last token, a speculative verification its last
token plus the draft tokens. Rows are right-padded into one (B, T) batch; the `StepBatch` of
`inference.engine.paged_cache` tells every attention layer where to write the new K/V and which
slots of the block pool hold each row's context (Kwon et al., 2023). Logits are computed only
where they are needed (the last token of each row, or every token for verification), so a long
prefill never pays for a (T, vocab) head.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from inference.engine.compiled_decode import CompiledDecode
from inference.engine.paged_cache import PagedKVCache
from model.transformer import Transformer

PAD_TOKEN_ID = 0  # any valid id: padding positions are masked out and their K/V go to scratch


@dataclass
class Row:
    """What one sequence computes in a forward."""

    token_ids: list[int]  # the new tokens
    start: int  # position of token_ids[0]; positions [0, start) already have K/V in the pool
    block_table: list[int]  # covers positions [0, start + len(token_ids))
    slot: Optional[int] = None  # sequence slot (linear-attention state)


class ModelRunner:
    """A model and its paged cache; `forward` runs one batch of rows. With ``compiled`` (a
    `CompiledDecode`), decode steps it supports run its compiled graph instead of the eager model."""

    def __init__(self, model: Transformer, cache: PagedKVCache, compiled: Optional["CompiledDecode"] = None) -> None:
        self.model = model
        self.cache = cache
        self.device = cache.device
        self.compiled = compiled

    @torch.inference_mode()
    def forward(self, rows: list[Row], logits: str = "last", packed: bool = False) -> Optional[torch.Tensor]:
        """Compute every row's new tokens, writing their K/V into the pool.

        ``logits``: "last" -> (B, V) at each row's last new token; "all" -> (B, T, V) at every
        new token (padding rows included, T the longest row); "none" -> None (cache only).
        ``packed``: the rows side by side in one row, no padding (`PackedStepBatch`; "last" only).
        """
        if self.compiled is not None and logits == "last" and not packed and self.compiled.supports(rows):
            out = self.compiled(rows)  # (B, V); None if compilation failed (then it stays off)
            if out is not None:
                return out
        lens = [len(r.token_ids) for r in rows]
        if packed:
            tokens = torch.tensor([[t for r in rows for t in r.token_ids]], device=self.device)  # (1, N)
            step = self.cache.begin_step([r.start for r in rows], lens, [r.block_table for r in rows],
                                         [r.slot for r in rows], packed=True)
            hidden = self.model.forward_hidden(tokens, step.positions, self.cache)  # (1, N, D)
            last = torch.tensor(lens, device=self.device).cumsum(0) - 1  # (B,) each row's last token
            return self.model.head(self.model.norm(hidden[0, last]))  # (B, V)
        seq_len = max(lens)
        padded = [r.token_ids + [PAD_TOKEN_ID] * (seq_len - len(r.token_ids)) for r in rows]
        tokens = torch.tensor(padded, device=self.device)  # (B, T)
        step = self.cache.begin_step([r.start for r in rows], lens, [r.block_table for r in rows],
                                     [r.slot for r in rows])
        hidden = self.model.forward_hidden(tokens, step.positions, self.cache)  # (B, T, D)
        if logits == "none":
            return None
        if logits == "all":
            return self.model.head(self.model.norm(hidden))  # (B, T, V)
        if all(n == seq_len for n in lens):  # no padding: every row ends in the last column
            last = hidden[:, -1]  # (B, D)
        else:
            last = hidden[torch.arange(len(rows), device=self.device), torch.tensor(lens, device=self.device) - 1]
        return self.model.head(self.model.norm(last))  # (B, V)
