"""Context parallelism: one sequence split across the ``cp`` ranks of a group, attention by
ring (`trainer.ring_attention`, Liu et al. 2023).

Load balance (zig-zag sharding, as in Llama 3's context parallelism, Dubey et al. 2024 §3.3.2):
the sequence is cut into 2·cp equal chunks and rank r holds chunks r and 2·cp-1-r. Under a
causal mask, early chunks see few keys and late chunks many, so pairing chunk r with its mirror
gives every rank the same work — with plain contiguous shards the last rank would do
(2·cp-1) times the work of the first while the others wait.

Everything that is a sequence goes through the same split: `shard_batch` cuts every (B, T)
tensor of a batch (tokens, labels, document ids) into this rank's slots, after adding the
*global* positions (restarting per document when the batch has ``doc_ids``), so RoPE sees the
true position of every token. Per-token work (embedding, norms, FFN, MoE, the loss) needs no
change; attention layers get a `RingAttention` hook (``module.context_parallel``) that makes
them attend across the ring. The loss of a rank is the sum over its own targets; the engine
divides by the step's global target count and DDP / FSDP2 average the gradients over all
ranks (data- and context-parallel), which gives exactly the single-process gradient.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

from model.positions import positions_from_doc_ids
from trainer.ring_attention import RingLayout, ring_attention
from utils.config import TrainingConfig
from utils.errors import UserError

Batch = dict[str, Tensor]


def zigzag_slots(seq_len: int, cp: int, rank: int) -> Tensor:
    """Global token indices (T / cp,) that rank `rank` holds: chunks `rank` and `2·cp-1-rank`
    of 2·cp equal chunks, in increasing order."""
    if seq_len % (2 * cp):
        raise UserError(f"sequence length {seq_len} is not divisible by 2 x training.context_parallel = {2 * cp} "
                        "(zig-zag sharding): change data.seq_len")
    chunk = seq_len // (2 * cp)
    first = torch.arange(rank * chunk, (rank + 1) * chunk)
    second = torch.arange((2 * cp - 1 - rank) * chunk, (2 * cp - rank) * chunk)
    return torch.cat([first, second])


def shard_batch(batch: Batch, cp: int, rank: int) -> Batch:
    """This rank's share of every (B, T) tensor of a batch, with the global ``position_ids``
    added first (from ``doc_ids`` when present). Other entries are kept as they are."""
    tokens = batch["input_ids"]  # (B, T)
    seq_len = tokens.shape[1]
    out = dict(batch)
    if "position_ids" not in out:
        doc_ids = out.get("doc_ids")
        out["position_ids"] = (positions_from_doc_ids(doc_ids) if doc_ids is not None
                               else torch.arange(seq_len, device=tokens.device).expand_as(tokens))
    slots = zigzag_slots(seq_len, cp, rank).to(tokens.device)
    for key, value in out.items():
        if isinstance(value, Tensor) and value.dim() >= 2 and value.shape[1] == seq_len:
            out[key] = value.index_select(1, slots).contiguous()  # (B, T / cp, ...)
    return out


class RingAttention:
    """The hook an attention layer calls instead of local attention (``module.context_parallel``).

    Called with this rank's q (B, H, T/cp, d), k (B, n_kv, T/cp, d), v (B, n_kv, T/cp, dv),
    the softmax scale, the local ``doc_ids`` (B, T/cp) or None and the sliding window; gathers
    the document ids of the whole sequence (once per call: a few integers per token) and runs
    `ring_attention` over the group.
    """

    def __init__(self, group: dist.ProcessGroup) -> None:
        self.group = group
        self.size = dist.get_world_size(group)

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, scale: float, doc_ids: Optional[Tensor],
                 window: Optional[int] = None) -> Tensor:
        seq_len = q.shape[2] * self.size
        slots = [zigzag_slots(seq_len, self.size, r) for r in range(self.size)]  # CPU
        docs = None
        if doc_ids is not None:
            parts = [torch.empty_like(doc_ids) for _ in range(self.size)]
            dist.all_gather(parts, doc_ids.contiguous(), group=self.group)
            docs = torch.empty(doc_ids.shape[0], seq_len, dtype=doc_ids.dtype, device=doc_ids.device)
            for r, part in enumerate(parts):
                docs[:, slots[r].to(docs.device)] = part  # (B, T) in global order
        return ring_attention(q, k, v, scale, RingLayout(self.group, slots, docs, q.device), window)


def check_supported(model: nn.Module, tcfg: TrainingConfig) -> None:
    """Refuse (one line) what ring attention does not compute exactly."""
    cfg = getattr(model, "cfg", None)
    if cfg is None:
        raise UserError("training.context_parallel needs a model of this toolkit (model.Transformer)")
    problems = {
        "training.compile (the ring's point-to-point sends)": tcfg.compile,
        "model.attention_type=linear": cfg.attention_type == "linear",
        "Mamba-2 layers (their scan runs along the whole sequence)": cfg.has_mamba,
        "model.position_type=alibi": cfg.position_type == "alibi",
        "model.attn_logit_softcap": cfg.attn_logit_softcap is not None,
        "model.dropout > 0 (attention dropout)": cfg.dropout > 0,
        "model.mtp_depth > 0 (MTP shifts across shard edges)": cfg.mtp_depth > 0,
        "model.moe.seq_aux_loss_alpha > 0 (per-sequence statistics)": cfg.moe is not None
        and cfg.moe.seq_aux_loss_alpha > 0,
    }
    bad = [name for name, hit in problems.items() if hit]
    if bad:
        raise UserError(f"training.context_parallel > 1 does not support {', '.join(bad)}")


def apply_context_parallel(model: nn.Module, group: dist.ProcessGroup, tcfg: TrainingConfig) -> None:
    """Give every attention layer of `model` the ring-attention hook over `group`."""
    check_supported(model, tcfg)
    hook = RingAttention(group)
    for module in model.modules():
        if hasattr(module, "context_parallel"):
            module.context_parallel = hook


def shard_data(train_data: Iterator[Batch], val_data: Optional[Callable[[], Iterable[Batch]]], cp: int,
               rank: int) -> tuple[Iterator[Batch], Optional[Callable[[], Iterable[Batch]]]]:
    """The engine's training stream and validation factory, each batch cut to this rank's share."""
    sharded_val = None if val_data is None else lambda: (shard_batch(b, cp, rank) for b in val_data())
    return ShardedStream(train_data, cp, rank), sharded_val


class ShardedStream:
    """A training-batch iterator whose batches are cut to this rank's context-parallel share;
    ``state_dict`` / ``load_state_dict`` are the wrapped iterator's (exact resume)."""

    def __init__(self, data: Iterator[Batch], cp: int, rank: int) -> None:
        self.data, self.cp, self.rank = data, cp, rank

    def __iter__(self) -> "ShardedStream":
        return self

    def __next__(self) -> Batch:
        return shard_batch(next(self.data), self.cp, self.rank)

    def __getattr__(self, name: str) -> Any:  # state_dict, load_state_dict, steps_per_epoch, ...
        return getattr(self.data, name)
