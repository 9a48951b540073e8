"""Causal softmax attention: MHA / GQA / MQA with the options of the supported families.

- Multi-head attention: Vaswani et al. 2017, "Attention Is All You Need".
- Grouped-query / multi-query attention (``n_kv_heads`` < ``n_heads``): Ainslie et al. 2023
  (GQA), Shazeer 2019 (MQA).
- QK-norm (Qwen3, Gemma 3): an RMSNorm over head_dim on q and k, before RoPE.
- Sliding-window attention (Mistral; Gemma 2/3 local layers): Beltagy et al. 2020
  ("Longformer"); a query sees the ``window`` most recent keys, itself included.
- Logit soft-capping and ``query_pre_attn_scalar`` (Gemma 2, Team Gemma 2024).
- ALiBi biases (Press et al. 2022) and document masking for packed sequences.

The plain causal case calls ``F.scaled_dot_product_attention(is_causal=True)`` with no mask
tensor; masks are built only when needed (sliding window, documents, cache offsets, ALiBi).
Soft-capping needs the logits, so it takes an explicit (grouped, never repeated) path.

Masks are expressed in *slots*: without a cache a token's slot is its index in the sequence;
with a contiguous cache it is the cache slot, i.e. its position. A paged cache (the inference
engine's) gathers each row's keys by position and builds the mask of the step itself, from
the positions of every row (see `model.cache`).
"""
from __future__ import annotations

from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from model.cache import KVLayerCache, PagedLayerCache
from model.config import ModelConfig
from model.ffn import stack_linears
from model.norms import build_norm
from model.positions import alibi_bias, alibi_slopes, apply_rope, document_mask

Rope = Optional[tuple[torch.Tensor, torch.Tensor]]


def build_mask(
    q_start: int,
    q_len: int,
    k_start: int,
    k_len: int,
    window: Optional[int] = None,
    doc_ids: Optional[torch.Tensor] = None,
    device: Optional[torch.device] = None,
    force: bool = False,
    positions: Optional[torch.Tensor] = None,
) -> tuple[Optional[torch.Tensor], bool]:
    """Which keys each query may see, for queries at slots q_start.. and keys at k_start...

    Key j is visible to query i when j <= i, i - j < window (if any) and both belong to the
    same document or j to the row's shared prefix (if ``doc_ids`` (B, T) is given; see
    `model.positions.SHARED_PREFIX`). With documents the window is measured in ``positions``
    (B, T) when given, since a shared prefix puts other documents between a query and its keys.
    Returns ``(mask, is_causal)``: a boolean mask (B or 1, 1, T, S), True = attend; or
    ``(None, True)`` when sdpa's own causal mask is exact; or ``(None, False)`` when every key
    is visible. ``force`` always builds the mask.
    """
    if doc_ids is None and not force:
        q_last, k_last = q_start + q_len - 1, k_start + k_len - 1
        if k_start == q_start and k_len == q_len and (window is None or q_len <= window):
            return None, True
        if k_last <= q_start and (window is None or q_last - k_start < window):
            return None, False
    q = torch.arange(q_start, q_start + q_len, device=device)[:, None]  # (T, 1)
    k = torch.arange(k_start, k_start + k_len, device=device)[None, :]  # (1, S)
    mask = (k <= q)[None, None]  # (1, 1, T, S)
    if doc_ids is not None:
        mask = mask & document_mask(doc_ids)[:, None]  # (B, 1, T, T)
    if window is not None:
        if doc_ids is not None and positions is not None:
            mask = mask & (positions[:, None, :, None] - positions[:, None, None, :] < window)  # (B, 1, T, T)
        else:
            mask = mask & (q - k < window)
    return mask, False


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    mask: Optional[torch.Tensor] = None,
    is_causal: bool = False,
    bias: Optional[torch.Tensor] = None,
    softcap: Optional[float] = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """softmax(scale * q k^T [softcapped] + bias, masked) v.

    q: (B, H, T, d), k: (B, n_kv, S, d), v: (B, n_kv, S, dv) with H a multiple of n_kv;
    mask: bool (B|1, 1, T, S); bias: float (B|1, H, T, S). Returns (B, H, T, dv).
    """
    n_heads, n_kv = q.shape[1], k.shape[1]
    batch, _, seq_len, _ = q.shape
    if softcap is None and bias is None and n_heads != n_kv and seq_len == 1 and not is_causal and not dropout_p:
        # Decoding with shared K/V heads (GQA, MQA, MLA's absorbed latent head): the query heads
        # of a group become the query rows of one kv head, an exact plain attention. torch's
        # sdpa with enable_gqa and a mask takes a path that expands K/V per head: 3-10x slower.
        out = F.scaled_dot_product_attention(q.reshape(batch, n_kv, n_heads // n_kv, q.shape[-1]), k, v,
                                             attn_mask=mask, scale=scale)  # (B, n_kv, G, dv)
        return out.reshape(batch, n_heads, 1, v.shape[-1])
    if softcap is None:
        attn_mask = mask
        if bias is not None:
            attn_mask = bias.to(q.dtype) if mask is None else bias.to(q.dtype).masked_fill(~mask, float("-inf"))
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
            enable_gqa=n_heads != n_kv,
        )
    # explicit path (Gemma 2): queries grouped per kv head so K/V are never repeated
    group = n_heads // n_kv
    qg = q.reshape(batch, n_kv, group, seq_len, q.shape[-1])  # (B, n_kv, G, T, d)
    scores = (qg @ k.unsqueeze(2).transpose(-1, -2)) * scale  # (B, n_kv, G, T, S)
    scores = torch.tanh(scores / softcap) * softcap
    if bias is not None:
        scores = scores + bias.reshape(bias.shape[0], n_kv, group, seq_len, -1)
    if is_causal:
        mask = torch.ones(seq_len, k.shape[2], dtype=torch.bool, device=q.device).tril()[None, None]
    if mask is not None:
        scores = scores.masked_fill(~mask.unsqueeze(2), float("-inf"))
    probs = scores.softmax(dim=-1, dtype=torch.float32).to(q.dtype)
    if dropout_p > 0:
        probs = F.dropout(probs, p=dropout_p)
    out = probs @ v.unsqueeze(2)  # (B, n_kv, G, T, dv)
    return out.reshape(batch, n_heads, seq_len, v.shape[-1])


class Attention(nn.Module):
    """Causal self-attention with n_kv_heads key/value heads (MHA, GQA or MQA)."""

    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads = cfg.n_heads
        self.n_kv_heads = cfg.kv_heads
        self.head_dim = cfg.attn_head_dim
        self.q_proj = nn.Linear(cfg.dim, self.n_heads * self.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.dim, self.n_kv_heads * self.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.dim, self.n_kv_heads * self.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.dim, bias=cfg.attn_out_bias)
        self.qkv_proj: Optional[nn.Linear] = None  # q, k, v stacked: set by `fuse_projections` (inference)
        self.q_norm = build_norm(cfg, self.head_dim) if cfg.qk_norm else None
        self.k_norm = build_norm(cfg, self.head_dim) if cfg.qk_norm else None
        self.scale = (cfg.query_pre_attn_scalar or self.head_dim) ** -0.5
        self.window = cfg.sliding_window if cfg.layer_type(layer_idx) == "sliding" else None
        self.softcap = cfg.attn_logit_softcap
        self.alibi = cfg.position_type == "alibi"
        self.dropout = cfg.dropout
        self._slopes = alibi_slopes(self.n_heads) if self.alibi else None  # (H,) fp32, CPU
        # set by the trainer for context parallelism (`trainer.context_parallel.RingAttention`):
        # (q, k, v, scale, doc_ids, window) -> out, attention over a sequence sharded across ranks
        self.context_parallel: Optional[Callable[..., torch.Tensor]] = None

    def init_cache(self, batch_size: int, max_seq_len: int, device: torch.device, dtype: torch.dtype) -> KVLayerCache:
        return KVLayerCache(batch_size, max_seq_len, self.n_kv_heads, self.head_dim, device, dtype)

    @property
    def _qkv_sizes(self) -> list[int]:
        return [self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim, self.n_kv_heads * self.head_dim]

    def fuse_projections(self) -> None:
        """For inference: q, k and v from one matmul, ``qkv_proj`` holding the three weights stacked
        (out = H*hd + 2*n_kv*hd rows); q_proj / k_proj / v_proj are dropped."""
        self.qkv_proj = stack_linears([self.q_proj, self.k_proj, self.v_proj])
        self.q_proj = self.k_proj = self.v_proj = None

    def forward(
        self,
        x: torch.Tensor,
        rope: Rope,
        positions: torch.Tensor,
        cache: Optional[Union[KVLayerCache, PagedLayerCache]] = None,
        doc_ids: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """x (B, T, D), rope = (cos, sin) each (B, T, hd) or None, positions (B, T) -> (B, T, D)."""
        batch, seq_len, _ = x.shape
        if self.qkv_proj is not None:  # one matmul for the three
            q, k, v = self.qkv_proj(x).split(self._qkv_sizes, dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(batch, seq_len, self.n_heads, self.head_dim)  # (B, T, H, hd)
        k = k.view(batch, seq_len, self.n_kv_heads, self.head_dim)  # (B, T, n_kv, hd)
        v = v.view(batch, seq_len, self.n_kv_heads, self.head_dim)  # (B, T, n_kv, hd)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            cos, sin = rope
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)

        if self.context_parallel is not None and cache is None:  # training on this rank's share of the sequence
            out = self.context_parallel(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), self.scale, doc_ids,
                                        self.window)  # (B, H, T, hd)
            return self.o_proj(out.transpose(1, 2).reshape(batch, seq_len, -1))
        force = self.alibi or self.softcap is not None
        if cache is not None and doc_ids is not None:
            raise ValueError("document masking (doc_ids) is only supported without a cache")
        if cache is not None and cache.paged:
            # rows at their own positions: each row's keys 0 .. S-1 gathered from the block pool
            k, v = cache.update(positions, k, v)  # (B, S, n_kv, hd), padded per row
            mask, is_causal = cache.mask(self.window, force)
            bias = None
            if self.alibi:
                bias = torch.stack([alibi_bias(self._slopes, q_pos, k_pos)
                                    for q_pos, k_pos in zip(positions, cache.key_positions)])  # (B, H, T, S)
        else:
            q_start = k_start = 0
            if cache is not None:
                q_start = int(positions[0, 0])  # contiguous cache: the batch shares slots = positions
                k, v = cache.update(q_start, k, v)  # (B, S, n_kv, hd)
                if self.window is not None:  # keys older than the window are never needed
                    k_start = max(0, q_start - self.window + 1)
                    k, v = k[:, k_start:], v[:, k_start:]
            k_len = k.shape[1]
            mask, is_causal = build_mask(q_start, seq_len, k_start, k_len, self.window, doc_ids, x.device, force,
                                         positions)
            bias = None
            if self.alibi and doc_ids is not None:  # distances in positions (a shared prefix is not adjacent)
                bias = torch.stack([alibi_bias(self._slopes, p, p) for p in positions])  # (B, H, T, T)
            elif self.alibi:
                q_slots = torch.arange(q_start, q_start + seq_len, device=x.device)
                k_slots = torch.arange(k_start, k_start + k_len, device=x.device)
                bias = alibi_bias(self._slopes, q_slots, k_slots)[None]  # (1, H, T, S)
        out = attend(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), self.scale, mask, is_causal, bias,
            self.softcap, self.dropout if self.training else 0.0,
        )  # (B, H, T, hd)
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq_len, -1))
