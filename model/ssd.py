"""The math of a Mamba-2 layer as pure functions: causal depthwise conv and the SSD scan.

Mamba-2's state space model (Dao & Gu 2024, "Transformers are SSMs: Generalized Models and
Efficient Algorithms Through Structured State Space Duality") keeps, per head, a state
h (P, N) that decays by a scalar per token:

    h_t = exp(a_t) h_{t-1} + x_t B_t^T        a_t = dt_t * A  (<= 0),  x_t already times dt_t
    y_t = h_t C_t

`ssd_step` is this recurrence for one token (decoding). `ssd_chunked_scan` computes the same
outputs for a whole sequence with the paper's chunked algorithm (§6, "SSD algorithm"): the
sequence is cut into chunks of Q tokens; inside a chunk the outputs come from the quadratic
"attention" form ``y = (L ∘ C B^T) x`` with the decay mask ``L[l, s] = exp(a_{s+1} + ... + a_l)``;
each chunk's contribution to the state at its end is passed to the next chunk by the recurrence
over chunks, and read back inside the next chunk through C. Costs are linear in T, quadratic
only in Q.

Packed documents: ``seg`` (B, T) numbers the documents of a row in order (`segment_ids`). A
token sees no conv input and no state from another document, exactly as if each document ran
alone from a zero state. Since segments are contiguous, "s and l in the same document" is
"no document starts in (s, l]", which is what the masks below test.

Both scans accumulate in the dtype of their inputs; callers pass fp32 (or fp64).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def segment_ids(doc_ids: torch.Tensor) -> torch.Tensor:
    """doc_ids (B, T) -> (B, T) 0, 1, 2, ...: the index of each token's run of equal ids in its row."""
    starts = doc_ids[:, 1:] != doc_ids[:, :-1]  # (B, T - 1) a new document starts here
    return F.pad(starts.long().cumsum(-1), (1, 0))


def causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    state: Optional[torch.Tensor] = None,
    seg: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Causal depthwise convolution: out_t = bias + sum_k weight[:, k] * x_{t-K+1+k}.

    x (B, T, C), weight (C, K) (``nn.Conv1d(C, C, K, groups=C).weight[:, 0]``), bias (C,);
    ``state`` (B, C, K-1): the K-1 inputs before x (zeros when None); ``seg`` (B, T): inputs of
    another document count as zero. Returns (B, T, C).
    """
    seq_len, kernel = x.shape[1], weight.shape[1]
    past = x.new_zeros(x.shape[0], kernel - 1, x.shape[2]) if state is None else state.transpose(1, 2).to(x.dtype)
    xp = torch.cat([past, x], dim=1)  # (B, K-1+T, C)
    out = x * weight[:, -1]  # lag 0
    for lag in range(1, kernel):
        term = xp[:, kernel - 1 - lag : kernel - 1 - lag + seq_len] * weight[:, -1 - lag]  # x_{t-lag}
        if seg is not None:
            same = torch.zeros_like(seg, dtype=torch.bool)  # (B, T) x_{t-lag} is in t's document
            same[:, lag:] = seg[:, lag:] == seg[:, :-lag]
            term = term * same[..., None]
        out = out + term
    return out if bias is None else out + bias


def conv_state_after(x: torch.Tensor, state: torch.Tensor, lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The conv state after consuming x: each row's last K-1 inputs, (B, C, K-1).

    x (B, T, C); ``state`` (B, C, K-1) the inputs before x; ``lengths`` (B,): row b consumed
    only its first lengths[b] tokens (the rest is padding); None = all T.
    """
    width, channels = state.shape[-1], x.shape[-1]  # K-1
    xp = torch.cat([state.transpose(1, 2).to(x.dtype), x], dim=1)  # (B, K-1+T, C)
    if lengths is None:
        return xp[:, xp.shape[1] - width :].transpose(1, 2)
    idx = lengths[:, None] + torch.arange(width, device=x.device)  # (B, K-1) slots len .. len+K-2 of xp
    return xp.gather(1, idx[..., None].expand(-1, -1, channels)).transpose(1, 2)


def ssd_step(
    state: torch.Tensor, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token of the recurrence: (y (Bt, H, P), new state (Bt, H, P, N)).

    state (Bt, H, P, N), x (Bt, H, P), dt (Bt, H) (after softplus), A (H,) (negative),
    B and C (Bt, G, N): head h uses group h // (H / G).
    """
    batch, n_heads, head_dim = x.shape
    groups, state_size = B.shape[1:]
    decay = torch.exp(dt * A)[..., None, None]  # (Bt, H, 1, 1)
    inp = (x * dt[..., None]).view(batch, groups, -1, head_dim, 1) * B[:, :, None, None, :]  # (Bt, G, R, P, N)
    new = state * decay + inp.view(batch, n_heads, head_dim, state_size)  # (Bt, H, P, N)
    y = new.view(batch, groups, -1, head_dim, state_size) @ C[:, :, None, :, None]  # (Bt, G, R, P, 1)
    return y.view(batch, n_heads, head_dim), new


def segsum(a: torch.Tensor) -> torch.Tensor:
    """a (..., Q) -> (..., Q, Q): out[l, s] = a_{s+1} + ... + a_l for s <= l (0 on the diagonal), -inf above.

    Summed from masked copies (the paper's stable form), not as a difference of cumulative sums.
    """
    q = a.shape[-1]
    rows = a[..., :, None].expand(*a.shape, q)  # [k, s] = a_k
    lower = torch.ones(q, q, dtype=torch.bool, device=a.device).tril()  # s <= l
    out = rows.masked_fill(~lower.tril(-1), 0.0).cumsum(dim=-2)  # [l, s] = sum over s < k <= l
    return out.masked_fill(~lower, float("-inf"))


def ssd_chunked_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    init_state: Optional[torch.Tensor] = None,
    seg: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The recurrence over a whole sequence, chunk by chunk: (y (Bt, T, H, P), final state (Bt, H, P, N)).

    x (Bt, T, H, P), dt (Bt, T, H) (after softplus; 0 leaves the state untouched, which is how
    padding is skipped), A (H,), B and C (Bt, T, G, N); ``init_state`` (Bt, H, P, N) the state
    before the first token (zeros when None); ``seg`` (Bt, T) document segments (`segment_ids`).
    """
    batch, seq_len, n_heads, head_dim = x.shape
    groups, state_size = B.shape[2:]
    reps = n_heads // groups  # heads per group: head h = (g, r), g = h // reps
    q = min(chunk_size, seq_len)
    pad = (-seq_len) % q
    a = dt * A  # (Bt, T, H) log-decays
    xdt = x * dt[..., None]  # (Bt, T, H, P)
    b, c = B, C
    if pad:  # a = 0, x = 0: the padding neither decays nor feeds the state
        a, xdt, b, c = (F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad)) for t in (a, xdt, b, c))
        if seg is not None:
            seg = torch.cat([seg, seg[:, -1:].expand(-1, pad)], dim=1)
    n_chunks = (seq_len + pad) // q
    xdt = xdt.view(batch, n_chunks, q, groups, reps, head_dim)  # (Bt, nc, Q, G, R, P)
    b, c = (t.view(batch, n_chunks, q, groups, state_size) for t in (b, c))  # (Bt, nc, Q, G, N)
    a = a.view(batch, n_chunks, q, groups, reps).permute(0, 3, 4, 1, 2)  # (Bt, G, R, nc, Q)
    a_cum = a.cumsum(dim=-1)  # (Bt, G, R, nc, Q)
    sc = None if seg is None else seg.view(batch, n_chunks, q)[:, None, None]  # (Bt, 1, 1, nc, Q)

    # 1. inside each chunk: the quadratic form with the decay mask L (C B^T is shared by a group's heads)
    log_l = segsum(a)  # (Bt, G, R, nc, Q, Q)
    if sc is not None:
        log_l = log_l.masked_fill(sc[..., :, None] != sc[..., None, :], float("-inf"))
    scores = torch.einsum("bclgn,bcsgn->bgcls", c, b)[:, :, None] * torch.exp(log_l)  # (Bt, G, R, nc, Q, Q)
    y_diag = torch.einsum("bgrcls,bcsgrp->bclgrp", scores, xdt)  # (Bt, nc, Q, G, R, P)

    # 2. each chunk's inputs, decayed to the chunk's end: its own contribution to the state there
    to_end = torch.exp(a_cum[..., -1:] - a_cum)  # (Bt, G, R, nc, Q)
    if sc is not None:
        to_end = to_end * (sc == sc[..., -1:])  # only the document that reaches the chunk's end
    chunk_states = torch.einsum("bgrcs,bcsgn,bcsgrp->bcgrpn", to_end, b, xdt)  # (Bt, nc, G, R, P, N)

    # 3. across chunks: the recurrence on the states at chunk boundaries
    shape = (batch, groups, reps, head_dim, state_size)
    h = x.new_zeros(shape) if init_state is None else init_state.to(x.dtype).reshape(shape)  # (Bt, G, R, P, N)
    chunk_decay = torch.exp(a_cum[..., -1])  # (Bt, G, R, nc)
    starts = []
    for k in range(n_chunks):
        if sc is not None and k > 0:  # a document starting the chunk starts from zero
            h = h * (sc[:, :, :, k, 0] == sc[:, :, :, k - 1, -1])[..., None, None]
        starts.append(h)
        carry = chunk_decay[..., k, None, None]  # (Bt, G, R, 1, 1)
        if sc is not None:  # the carried state does not reach the end past a document start
            carry = carry * (sc[:, :, :, k, -1] == sc[:, :, :, k, 0])[..., None, None]
        h = carry * h + chunk_states[:, k]
    h_start = torch.stack(starts, dim=1)  # (Bt, nc, G, R, P, N) state entering each chunk

    # 4. the state entering each chunk, decayed to and read by each of its tokens
    from_start = torch.exp(a_cum)  # (Bt, G, R, nc, Q)
    if sc is not None:
        from_start = from_start * (sc == sc[..., :1])
    y_off = torch.einsum("bclgn,bcgrpn,bgrcl->bclgrp", c, h_start, from_start)  # (Bt, nc, Q, G, R, P)

    y = (y_diag + y_off).reshape(batch, n_chunks * q, n_heads, head_dim)[:, :seq_len]
    return y, h.reshape(batch, n_heads, head_dim, state_size)
