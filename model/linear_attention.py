"""Causal linear attention (Katharopoulos et al. 2020, "Transformers are RNNs").

Softmax similarity is replaced by a kernel ``phi(q) . phi(k)`` with ``phi(x) = elu(x) + 1``
(the paper's choice) or ``relu(x)``; then for token i

    out_i = phi(q_i) S_i / (phi(q_i) . z_i + eps),  S_i = sum_{j<=i} phi(k_j) v_j^T,  z_i = sum_{j<=i} phi(k_j)

Training (no cache) uses the equivalent parallel form: a causal (T, T) matrix
``A = phi(Q) phi(K)^T`` masked to the same document, ``out = A V / (A 1 + eps)``.
With a cache the O(1) state (S, z) is carried between calls: a call of T tokens adds the
carried state to the causal in-chunk sums and returns the updated state; for T = 1 (decoding)
this is exactly the RNN recurrence of the paper (eq. 16-20). Both forms give the same outputs.
RoPE, when used, rotates q and k before the feature map (as in RoFormer's linear-attention
variant, Su et al. 2021). Sums are accumulated in at least fp32.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from model.cache import PagedStateCache
from model.config import ModelConfig
from model.positions import apply_rope, document_mask

EPS = 1e-6


def feature_map(x: torch.Tensor, kind: str) -> torch.Tensor:
    """phi(x): ``elu(x) + 1`` (kind "elu") or ``relu(x)`` (kind "relu"); both non-negative."""
    if kind == "elu":
        return F.elu(x) + 1.0
    if kind == "relu":
        return F.relu(x)
    raise ValueError(f"linear_feature_map must be 'elu' or 'relu', got {kind!r}")


def causal_linear_attention(
    phi_q: torch.Tensor,
    phi_k: torch.Tensor,
    v: torch.Tensor,
    doc_ids: Optional[torch.Tensor] = None,
    init: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
    eps: float = EPS,
) -> torch.Tensor:
    """Normalised causal linear attention in parallel form.

    phi_q, phi_k, v: (B, H, T, hd); doc_ids: (B, T) — token i only sees tokens j <= i of its own
    document or of the row's shared prefix (`model.positions.SHARED_PREFIX`). ``init = (S0 (B, H,
    hd, hd), z0 (B, H, hd))`` is a state carried in from earlier tokens, seen by every token of
    the chunk. Returns (B, H, T, hd).
    """
    seq_len = phi_q.shape[2]
    mask = torch.ones(seq_len, seq_len, dtype=torch.bool, device=phi_q.device).tril()  # (T, T)
    if doc_ids is not None:
        mask = mask & document_mask(doc_ids).unsqueeze(1)  # (B, 1, T, T)
    scores = (phi_q @ phi_k.transpose(-1, -2)) * mask  # (B, H, T, T)
    num = scores @ v  # (B, H, T, hd)
    den = scores.sum(dim=-1)  # (B, H, T)
    if init is not None:
        s0, z0 = init
        num = num + phi_q @ s0  # (B, H, T, hd)
        den = den + (phi_q @ z0.unsqueeze(-1)).squeeze(-1)  # (B, H, T)
    return num / (den.unsqueeze(-1) + eps)


@dataclass
class LinearAttentionState:
    """Recurrent state of one linear-attention layer (constant size in the sequence length)."""

    S: torch.Tensor  # (B, H, hd, hd) sum of phi(k) v^T over the tokens consumed
    z: torch.Tensor  # (B, H, hd) sum of phi(k)
    max_seq_len: int  # positions the cache accepts in total (same contract as a KV cache)
    length: int = 0  # tokens consumed so far = position of the next token
    paged = False  # one state per row, rows share positions (the engine's paged form: PagedStateCache)


class LinearAttention(nn.Module):
    """Multi-head causal linear attention with GQA (kv heads repeated) and optional RoPE."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads = cfg.n_heads
        self.n_kv_heads = cfg.kv_heads
        self.head_dim = cfg.attn_head_dim
        self.feature = cfg.linear_feature_map
        self.q_proj = nn.Linear(cfg.dim, self.n_heads * self.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.dim, self.n_kv_heads * self.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.dim, self.n_kv_heads * self.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.dim, bias=cfg.attn_out_bias)

    def init_cache(
        self, batch_size: int, max_seq_len: int, device: torch.device, dtype: torch.dtype
    ) -> LinearAttentionState:
        """Zero state; kept in ``dtype`` promoted to at least fp32 (bf16 sums would drift)."""
        state_dtype = torch.promote_types(dtype, torch.float32)
        hd = self.head_dim
        return LinearAttentionState(
            S=torch.zeros(batch_size, self.n_heads, hd, hd, device=device, dtype=state_dtype),
            z=torch.zeros(batch_size, self.n_heads, hd, device=device, dtype=state_dtype),
            max_seq_len=max_seq_len,
        )

    def forward(
        self,
        x: torch.Tensor,
        rope: Optional[tuple[torch.Tensor, torch.Tensor]],
        positions: torch.Tensor,
        cache: Optional[Union[LinearAttentionState, PagedStateCache]] = None,
        doc_ids: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """x (B, T, D), rope = (cos, sin) each (B, T, hd) or None, positions (B, T) -> (B, T, D).

        With a cache the chunk must continue the state: ``positions[0, 0] == cache.length``
        (the batch shares positions, as with the contiguous KV caches); a paged state cache
        (the inference engine's) keeps one state per sequence instead. Document masking
        (``doc_ids``) is a training feature and needs ``cache=None``. No attention dropout:
        there are no attention probabilities to drop.
        """
        batch, seq_len, _ = x.shape
        q = self.q_proj(x).view(batch, seq_len, self.n_heads, self.head_dim)  # (B, T, H, hd)
        k = self.k_proj(x).view(batch, seq_len, self.n_kv_heads, self.head_dim)  # (B, T, n_kv, hd)
        v = self.v_proj(x).view(batch, seq_len, self.n_kv_heads, self.head_dim)  # (B, T, n_kv, hd)
        if rope is not None:
            cos, sin = rope
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        rep = self.n_heads // self.n_kv_heads
        k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)  # (B, T, H, hd)

        work_dtype = torch.promote_types(x.dtype, torch.float32) if cache is None or cache.paged else cache.S.dtype
        phi_q = feature_map(q.transpose(1, 2).to(work_dtype), self.feature)  # (B, H, T, hd)
        phi_k = feature_map(k.transpose(1, 2).to(work_dtype), self.feature)  # (B, H, T, hd)
        v = v.transpose(1, 2).to(work_dtype)  # (B, H, T, hd)

        if cache is None:
            out = causal_linear_attention(phi_q, phi_k, v, doc_ids)
        elif doc_ids is not None:
            raise ValueError("document masking (doc_ids) is only supported without a cache")
        elif cache.paged:
            out = self._paged_step(cache, phi_q, phi_k, v)
        else:
            out = self._step(cache, int(positions[0, 0]), phi_q, phi_k, v)
        out = out.transpose(1, 2).reshape(batch, seq_len, -1).to(x.dtype)  # (B, T, H * hd)
        return self.o_proj(out)

    def _step(
        self, state: LinearAttentionState, start: int, phi_q: torch.Tensor, phi_k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        """Outputs of a chunk (prefill, or one decoded token) given the carried state; updates it."""
        seq_len = phi_q.shape[2]
        if start != state.length:
            raise ValueError(
                f"linear-attention state has consumed {state.length} tokens and cannot rewind or skip; "
                f"got a chunk starting at position {start}"
            )
        if start + seq_len > state.max_seq_len:
            raise ValueError(f"linear-attention cache holds {state.max_seq_len} positions, got {start} + {seq_len}")
        out = causal_linear_attention(phi_q, phi_k, v, init=(state.S, state.z))
        state.S = state.S + phi_k.transpose(-1, -2) @ v  # (B, H, hd, hd)
        state.z = state.z + phi_k.sum(dim=2)  # (B, H, hd)
        state.length += seq_len
        return out

    @staticmethod
    def _paged_step(cache: PagedStateCache, phi_q: torch.Tensor, phi_k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """`_step` for the inference engine: each row continues its own sequence's state."""
        s0, z0 = cache.read_state()  # (B, H, hd, hd), (B, H, hd)
        phi_k = phi_k * cache.token_mask[:, None, :, None]  # padding after a row's tokens adds nothing
        out = causal_linear_attention(phi_q, phi_k, v, init=(s0, z0))
        cache.write_state(s0 + phi_k.transpose(-1, -2) @ v, z0 + phi_k.sum(dim=2))
        return out
