"""Multi-head Latent Attention (MLA) of DeepSeek-V2 (Liu et al. 2024, §2.1) as used in DeepSeek-V3.

Keys and values are compressed jointly into a latent ``c_kv`` of size ``kv_lora_rank``
(``kv_a_proj`` then ``kv_a_norm``) and re-expanded per head by ``kv_b_proj`` into a
position-free key part (qk_nope_head_dim) and the value (v_head_dim). Position enters through
a decoupled RoPE key ``k_pe`` (qk_rope_head_dim) shared by all heads and computed from the
hidden state alongside the latent. Queries are optionally low-rank too (``q_a_proj`` ->
``q_a_norm`` -> ``q_b_proj`` when ``q_lora_rank`` is set).

The cache stores only ``c_kv`` and the *rotated* ``k_pe``. Two ways to attend over it:

- naive: up-project the cached latents to per-head K and V, then ordinary attention;
- absorbed (``absorb = True``, the paper's inference trick): fold the key up-projection into
  the query (q_nope W_uk -> latent space) and the value up-projection into the output, so
  attention runs directly over the latents: a single shared "kv head" of width
  kv_lora_rank + qk_rope_head_dim. Both give the same result.

With the inference engine's paged cache, decode steps (one token per row) always take the
absorbed path: per step it reads only the latents instead of expanding them for every head.

Softmax scale: (qk_nope_head_dim + qk_rope_head_dim)^-0.5, times mscale(factor,
mscale_all_dim)^2 under YaRN, as in DeepSeek's reference code.
"""
from __future__ import annotations

from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from model.attention import Rope, attend, build_mask
from model.cache import LatentLayerCache, PagedLayerCache
from model.config import ModelConfig
from model.norms import RMSNorm
from model.positions import apply_rope, yarn_softmax_mscale

LATENT_NORM_EPS = 1e-6  # q_a_norm / kv_a_norm: fixed in DeepSeek's reference code (not rms_norm_eps)


class MLA(nn.Module):
    """Multi-head latent attention with decoupled RoPE and a latent KV cache."""

    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads = cfg.n_heads
        self.q_lora_rank = cfg.q_lora_rank
        self.kv_lora_rank = cfg.kv_lora_rank
        self.nope_dim = cfg.qk_nope_head_dim
        self.rope_dim = cfg.qk_rope_head_dim
        self.v_dim = cfg.v_head_dim
        qk_dim = self.nope_dim + self.rope_dim
        if cfg.q_lora_rank is None:
            self.q_proj = nn.Linear(cfg.dim, self.n_heads * qk_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(cfg.dim, cfg.q_lora_rank, bias=cfg.qkv_bias)
            self.q_a_norm = RMSNorm(cfg.q_lora_rank, LATENT_NORM_EPS)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, self.n_heads * qk_dim, bias=False)
        self.kv_a_proj = nn.Linear(cfg.dim, self.kv_lora_rank + self.rope_dim, bias=cfg.qkv_bias)
        self.kv_a_norm = RMSNorm(self.kv_lora_rank, LATENT_NORM_EPS)
        self.kv_b_proj = nn.Linear(self.kv_lora_rank, self.n_heads * (self.nope_dim + self.v_dim), bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.v_dim, cfg.dim, bias=cfg.attn_out_bias)
        self.scale = qk_dim**-0.5 * yarn_softmax_mscale(cfg.rope_scaling)
        self.dropout = cfg.dropout
        self.absorb = False  # attend in latent space (weight absorption); see module docstring
        # set by the trainer for context parallelism (`trainer.context_parallel.RingAttention`):
        # (q, k, v, scale, doc_ids) -> out over a sequence sharded across ranks; per-head K/V travel
        self.context_parallel: Optional[Callable[..., torch.Tensor]] = None

    def init_cache(
        self, batch_size: int, max_seq_len: int, device: torch.device, dtype: torch.dtype
    ) -> LatentLayerCache:
        return LatentLayerCache(batch_size, max_seq_len, self.kv_lora_rank, self.rope_dim, device, dtype)

    def forward(
        self,
        x: torch.Tensor,
        rope: Rope,
        positions: torch.Tensor,
        cache: Optional[Union[LatentLayerCache, PagedLayerCache]] = None,
        doc_ids: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """x (B, T, D), rope = (cos, sin) each (B, T, qk_rope_head_dim), positions (B, T) -> (B, T, D)."""
        if rope is None:
            raise ValueError("MLA needs RoPE tables (decoupled RoPE)")
        batch, seq_len, _ = x.shape
        if self.q_lora_rank is None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_norm(self.q_a_proj(x)))
        q = q.view(batch, seq_len, self.n_heads, self.nope_dim + self.rope_dim)  # (B, T, H, dn + dr)
        q_nope, q_pe = q.split([self.nope_dim, self.rope_dim], dim=-1)
        c_kv, k_pe = self.kv_a_proj(x).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        c_kv = self.kv_a_norm(c_kv)  # (B, T, r)
        cos, sin = rope
        q_pe = apply_rope(q_pe, cos, sin)  # (B, T, H, dr)
        k_pe = apply_rope(k_pe.unsqueeze(2), cos, sin).squeeze(2)  # (B, T, dr), shared by all heads

        if self.context_parallel is not None and cache is None:  # training on this rank's share of the sequence
            q, k, v = self._expand(q_nope, q_pe, c_kv, k_pe)
            out = self.context_parallel(q, k, v, self.scale, doc_ids)  # (B, H, T, dv)
            return self.o_proj(out.transpose(1, 2).reshape(batch, seq_len, -1))
        absorb = self.absorb
        if cache is not None and doc_ids is not None:
            raise ValueError("document masking (doc_ids) is only supported without a cache")
        if cache is not None and cache.paged:
            # rows at their own positions: each row's latents 0 .. S-1 gathered from the block pool
            c_kv, k_pe = cache.update(positions, c_kv, k_pe)  # (B, S, r), (B, S, dr), padded per row
            mask, is_causal = cache.mask(None)
            absorb = absorb or seq_len == 1  # decoding attends in latent space
        else:
            q_start = 0
            if cache is not None:
                q_start = int(positions[0, 0])  # contiguous cache: the batch shares slots = positions
                c_kv, k_pe = cache.update(q_start, c_kv, k_pe)  # (B, S, r), (B, S, dr)
            mask, is_causal = build_mask(q_start, seq_len, 0, c_kv.shape[1], None, doc_ids, x.device)
        dropout = self.dropout if self.training else 0.0
        if absorb:
            out = self._absorbed(q_nope, q_pe, c_kv, k_pe, mask, is_causal, dropout)
        else:
            out = self._naive(q_nope, q_pe, c_kv, k_pe, mask, is_causal, dropout)
        return self.o_proj(out.reshape(batch, seq_len, -1))  # out: (B, T, H, dv)

    def _expand(self, q_nope, q_pe, c_kv, k_pe) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-head q (B, H, T, dn + dr), k (B, H, S, dn + dr), v (B, H, S, dv) from the latents."""
        batch, kv_len, _ = c_kv.shape
        kv = self.kv_b_proj(c_kv).view(batch, kv_len, self.n_heads, self.nope_dim + self.v_dim)
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)  # (B, S, H, dn), (B, S, H, dv)
        k_pe = k_pe.unsqueeze(2).expand(batch, kv_len, self.n_heads, self.rope_dim)  # (B, S, H, dr)
        q = torch.cat([q_nope, q_pe], dim=-1).transpose(1, 2)  # (B, H, T, dn + dr)
        k = torch.cat([k_nope, k_pe], dim=-1).transpose(1, 2)  # (B, H, S, dn + dr)
        return q, k, v.transpose(1, 2)

    def _naive(self, q_nope, q_pe, c_kv, k_pe, mask, is_causal, dropout) -> torch.Tensor:
        """Expand the latents to per-head K, V. Returns (B, T, H, dv)."""
        q, k, v = self._expand(q_nope, q_pe, c_kv, k_pe)
        qk_dim, dv = q.shape[-1], v.shape[-1]
        if dv < qk_dim and q.device.type == "cpu":
            # torch's fused CPU attention (flash) needs one head size for q, k and v; with
            # dv < dn + dr sdpa falls back to its unfused math path, ~1.6x slower forward +
            # backward at T = 256. Zero columns of V give zero output columns: exact.
            v = F.pad(v, (0, qk_dim - dv))  # (B, H, S, dn + dr)
        out = attend(q, k, v, self.scale, mask, is_causal, dropout_p=dropout)[..., :dv]  # (B, H, T, dv)
        return out.transpose(1, 2)

    def _absorbed(self, q_nope, q_pe, c_kv, k_pe, mask, is_causal, dropout) -> torch.Tensor:
        """Attention in latent space: q_nope W_uk . c_kv + q_pe . k_pe, output (P c_kv) W_uv^T."""
        w = self.kv_b_proj.weight.view(self.n_heads, self.nope_dim + self.v_dim, self.kv_lora_rank)
        w_uk, w_uv = w.split([self.nope_dim, self.v_dim], dim=1)  # (H, dn, r), (H, dv, r)
        q_lat = torch.einsum("bthn,hnr->bthr", q_nope, w_uk)  # (B, T, H, r)
        q = torch.cat([q_lat, q_pe], dim=-1).transpose(1, 2)  # (B, H, T, r + dr)
        k = torch.cat([c_kv, k_pe], dim=-1).unsqueeze(1)  # (B, 1, S, r + dr) one shared head
        o_lat = attend(q, k, c_kv.unsqueeze(1), self.scale, mask, is_causal, dropout_p=dropout)  # (B, H, T, r)
        return torch.einsum("bhtr,hvr->bthv", o_lat, w_uv)  # (B, T, H, dv)


def set_mla_absorb(model: nn.Module, enabled: bool = True) -> None:
    """Switch every MLA layer of ``model`` between the absorbed and the naive path."""
    for module in model.modules():
        if isinstance(module, MLA):
            module.absorb = enabled
