"""Ring attention: exact softmax attention over a sequence sharded across the ranks of a group.

Liu, Zaharia & Abbeel 2023, "Ring Attention with Blockwise Transformers for Near-Infinite
Context". Each of the ``n`` ranks holds the queries, keys and values of its own tokens. The K/V
blocks travel around the ring (rank r sends to r+1, receives from r-1) while every rank attends
its queries to the block it holds; the partial results are merged with the log-sum-exp of each
(online softmax, Milakov & Gimelshein 2018; FlashAttention, Dao et al. 2022). After ``n`` steps
every query has seen every key, and no rank ever holds more than two K/V blocks.

Which keys a query sees is decided by *slots*, the global indices of the tokens in the whole
sequence: key j is visible to query i when j <= i (causal), i - j < window (sliding window, if
any) and both lie in the same document (``doc_ids``, packed sequences). The sharding is the
caller's (`trainer.context_parallel`: zig-zag); a rank's slots must be increasing, so the keys
of a block that any query can see are a prefix of it and the queries that see any key a suffix:
only that part of each block is computed.

The math is in small pure functions — `block_attention` (one block: output and log-sum-exp),
`merge_partials` (two partial softmax results into one), `block_attention_grads` (the
FlashAttention backward of one block) — and `ring_attention` moves the blocks.

Backward: a custom `torch.autograd.Function`, not autograd through differentiable
collectives. Autograd would have to keep every received K/V block (and its attention
probabilities) alive until the backward, i.e. the whole sequence's K/V on every rank — the
memory ring attention exists to avoid. The custom backward keeps only the rank's own q, k, v,
output and log-sum-exp; it rotates K/V around the ring a second time, recomputes each block's
probabilities from the saved log-sum-exp, and sends a dK/dV accumulator along with each block,
which arrives back at the block's owner after one full turn holding every rank's contribution.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor


# ---------------------------------------------------------------------------- pure math
def merge_partials(out_a: Tensor, lse_a: Tensor, out_b: Tensor, lse_b: Tensor) -> tuple[Tensor, Tensor]:
    """Merge two softmax-attention results over disjoint key sets into the result over both.

    out (..., T, dv) is each part's softmax-weighted mean of its values, lse (..., T) the
    log-sum-exp of its scores (-inf where the part had no visible key). With
    lse = log(e^lse_a + e^lse_b): out = e^(lse_a - lse) out_a + e^(lse_b - lse) out_b.
    """
    lse = torch.logaddexp(lse_a, lse_b)
    safe = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)  # rows with no key at all stay 0
    out = torch.exp(lse_a - safe)[..., None] * out_a + torch.exp(lse_b - safe)[..., None] * out_b
    return out, lse


def _scores(q: Tensor, k: Tensor, scale: float, mask: Tensor) -> Tensor:
    """q (B, n_kv, G, T, d), k (B, n_kv, S, d), mask (B|1, 1, 1, T, S) -> masked scores (B, n_kv, G, T, S)."""
    scores = torch.einsum("bhgtd,bhsd->bhgts", q, k) * scale
    return scores.masked_fill(~mask, float("-inf"))


def block_attention(q: Tensor, k: Tensor, v: Tensor, scale: float, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Softmax attention of grouped queries over one K/V block, with its log-sum-exp.

    q (B, n_kv, G, T, d), k (B, n_kv, S, d), v (B, n_kv, S, dv), mask bool (B|1, 1, 1, T, S),
    True = attend. Returns out (B, n_kv, G, T, dv) and lse (B, n_kv, G, T); a query that sees
    no key of the block gets out 0 and lse -inf.
    """
    scores = _scores(q, k, scale, mask)
    lse = torch.logsumexp(scores, dim=-1)  # (B, n_kv, G, T)
    safe = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    probs = torch.exp(scores - safe[..., None])  # masked entries: exp(-inf) = 0
    return torch.einsum("bhgts,bhsv->bhgtv", probs, v), lse


def block_attention_grads(q: Tensor, k: Tensor, v: Tensor, scale: float, mask: Tensor, lse: Tensor,
                          dout: Tensor, delta: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of one block's share of the attention (FlashAttention's backward, Dao et al. 2022).

    Shapes as in `block_attention`; ``lse`` (B, n_kv, G, T) is the log-sum-exp over *all* keys
    (so P = exp(S - lse) are the final probabilities), ``dout`` (B, n_kv, G, T, dv) the output
    gradient and ``delta`` = rowsum(dout * out) (B, n_kv, G, T). dS = P (dP - delta) with
    dP = dout V^T; dq = scale dS K, dk = scale dS^T q, dv = P^T dout (summed over the G
    query heads sharing a K/V head). Returns dq (like q), dk (like k), dv (like v).
    """
    probs = torch.exp(_scores(q, k, scale, mask) - lse[..., None])  # (B, n_kv, G, T, S)
    dv = torch.einsum("bhgts,bhgtv->bhsv", probs, dout)
    dprobs = torch.einsum("bhgtv,bhsv->bhgts", dout, v)
    dscores = probs * (dprobs - delta[..., None])
    dq = torch.einsum("bhgts,bhsd->bhgtd", dscores, k) * scale
    dk = torch.einsum("bhgts,bhgtd->bhsd", dscores, q) * scale
    return dq, dk, dv


def visibility(q_slots: Tensor, k_slots: Tensor, q_docs: Optional[Tensor], k_docs: Optional[Tensor],
               window: Optional[int]) -> Tensor:
    """Which keys each query sees: q_slots (T,), k_slots (S,) global token indices, docs (B, T) /
    (B, S) document ids or None. Returns bool (B|1, 1, 1, T, S)."""
    q, k = q_slots[:, None], k_slots[None, :]  # (T, 1), (1, S)
    mask = k <= q
    if window is not None:
        mask = mask & (q - k < window)
    mask = mask[None]  # (1, T, S)
    if q_docs is not None:
        mask = mask & (q_docs[:, :, None] == k_docs[:, None, :])  # (B, T, S)
    return mask[:, None, None]


def active_range(q_slots: Tensor, k_slots: Tensor) -> tuple[int, int]:
    """(q0, k1): with increasing slots, only queries q0.. can see a key of the block and only
    keys ..k1 can be seen (causality); the rest of the block is skipped."""
    q0 = int(torch.searchsorted(q_slots, k_slots[:1]))
    k1 = int(torch.searchsorted(k_slots, q_slots[-1:], right=True))
    return q0, k1


# ---------------------------------------------------------------------------- the ring
class RingLayout:
    """Who holds which tokens: this rank's place in the ring and every rank's slots.

    ``slots[j]`` (T / n,) are the increasing global indices of rank j's tokens (on the CPU: the
    active ranges are known without a device sync); ``docs`` (B, T) the document ids of the
    whole sequence in slot order, or None (one document per row).
    """

    def __init__(self, group: dist.ProcessGroup, slots: list[Tensor], docs: Optional[Tensor],
                 device: torch.device) -> None:
        self.group = group
        self.size, self.rank = dist.get_world_size(group), dist.get_rank(group)
        self.ranges = [active_range(slots[self.rank], k_slots) for k_slots in slots]  # (q0, k1) per source
        self.slots, self.docs = [s.to(device) for s in slots], docs
        self.next = dist.get_global_rank(group, (self.rank + 1) % self.size)
        self.prev = dist.get_global_rank(group, (self.rank - 1) % self.size)

    def block(self, src: int, window: Optional[int]) -> tuple[Tensor, int, int]:
        """Mask (restricted to the active range) and active range of this rank's queries over
        the keys of rank `src`."""
        q_slots, k_slots = self.slots[self.rank], self.slots[src]
        q0, k1 = self.ranges[src]
        q_docs = k_docs = None
        if self.docs is not None:
            q_docs, k_docs = self.docs[:, q_slots[q0:]], self.docs[:, k_slots[:k1]]
        return visibility(q_slots[q0:], k_slots[:k1], q_docs, k_docs, window), q0, k1

    def rotate(self, tensors: list[Tensor], tag: int) -> tuple[list[Tensor], list]:
        """Start sending the (contiguous) `tensors` to the next rank and receiving the previous
        rank's into new buffers; returns (buffers, requests to wait on)."""
        bufs = [torch.empty_like(t) for t in tensors]
        ops = [dist.P2POp(dist.isend, t, self.next, self.group, tag) for t in tensors]
        ops += [dist.P2POp(dist.irecv, b, self.prev, self.group, tag) for b in bufs]
        return bufs, dist.batch_isend_irecv(ops)


def _wait(requests: list) -> None:
    for r in requests:
        r.wait()


class _RingAttention(torch.autograd.Function):
    """q (B, n_kv, G, T, d), k (B, n_kv, T, d), v (B, n_kv, T, dv) -> out (B, n_kv, G, T, dv)."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, scale: float, window: Optional[int],
                layout: RingLayout) -> Tensor:
        qf = q.float()
        out = torch.zeros(*q.shape[:-1], v.shape[-1], dtype=torch.float32, device=q.device)
        lse = torch.full(q.shape[:-1], float("-inf"), dtype=torch.float32, device=q.device)
        kv = [k.contiguous(), v.contiguous()]
        for step in range(layout.size):
            src = (layout.rank - step) % layout.size  # whose K/V this rank holds now
            if step + 1 < layout.size:
                incoming, requests = layout.rotate(kv, tag=0)  # overlaps with this block's compute
            mask, q0, k1 = layout.block(src, window)
            if q0 < q.shape[-2] and k1 > 0:
                o_b, l_b = block_attention(qf[..., q0:, :], kv[0][..., :k1, :].float(), kv[1][..., :k1, :].float(),
                                           scale, mask)
                out[..., q0:, :], lse[..., q0:] = merge_partials(out[..., q0:, :], lse[..., q0:], o_b, l_b)
            if step + 1 < layout.size:
                _wait(requests)
                kv = incoming
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale, ctx.window, ctx.layout = scale, window, layout
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, dout: Tensor):
        q, k, v, out, lse = ctx.saved_tensors
        layout, scale, window = ctx.layout, ctx.scale, ctx.window
        qf, dout = q.float(), dout.float()
        delta = (dout * out).sum(-1)  # (B, n_kv, G, T)
        dq = torch.zeros_like(qf)
        kv = [k.contiguous(), v.contiguous()]
        dkv = [torch.zeros_like(t, dtype=torch.float32) for t in kv]
        for step in range(layout.size):
            src = (layout.rank - step) % layout.size
            if step + 1 < layout.size:
                incoming, requests = layout.rotate(kv, tag=0)
            mask, q0, k1 = layout.block(src, window)
            if q0 < q.shape[-2] and k1 > 0:
                dq_b, dk_b, dv_b = block_attention_grads(
                    qf[..., q0:, :], kv[0][..., :k1, :].float(), kv[1][..., :k1, :].float(), scale, mask,
                    lse[..., q0:], dout[..., q0:, :], delta[..., q0:])
                dq[..., q0:, :] += dq_b
                dkv[0][..., :k1, :] += dk_b
                dkv[1][..., :k1, :] += dv_b
            # the accumulator of src's K/V moves on with it; after n moves it is back home, complete
            dkv, dkv_requests = layout.rotate(dkv, tag=1)
            _wait(dkv_requests)
            if step + 1 < layout.size:
                _wait(requests)
                kv = incoming
        return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype), None, None, None


def ring_attention(q: Tensor, k: Tensor, v: Tensor, scale: float, layout: RingLayout,
                   window: Optional[int] = None) -> Tensor:
    """Exact causal attention of this rank's queries over the keys of every rank of the ring.

    q (B, H, T, d), k (B, n_kv, T, d), v (B, n_kv, T, dv) with H a multiple of n_kv (GQA: the
    H / n_kv query heads of a group share one K/V head, never repeated). T is this rank's
    share; which global tokens it is comes from `layout`. Returns (B, H, T, dv).
    """
    batch, n_heads, seq_len, head_dim = q.shape
    n_kv = k.shape[1]
    grouped = q.reshape(batch, n_kv, n_heads // n_kv, seq_len, head_dim)  # (B, n_kv, G, T, d)
    out = _RingAttention.apply(grouped, k, v, scale, window, layout)  # (B, n_kv, G, T, dv)
    return out.reshape(batch, n_heads, seq_len, v.shape[-1])
