"""Mamba-2 layers (Dao & Gu 2024, "Transformers are SSMs", the SSD layer of §7) and their block.

The mixer, for input u (B, T, D) with d_inner = expand * D channels in H heads of P:

    z, xBC, dt = in_proj(u)                            gate (d_inner), conv input, time step (H)
    x, B, C    = silu(causal_conv1d(xBC))              depthwise conv over the last K tokens
    dt         = softplus(dt + dt_bias),  A = -exp(A_log)          one scalar decay per head
    y          = SSD(x, dt, A, B, C) + D x             `model.ssd`: chunked scan or one step
    out        = out_proj(gated_rmsnorm(y, z))         rmsnorm(y * silu(z)) per group

B and C (G groups of N) are shared by the heads of a group, like the kv heads of GQA. Without a
cache (training) the scan starts from zero; packed documents (``doc_ids``) each start from zero.
With a cache the layer keeps a constant-size state per sequence, the last K-1 conv inputs and
the SSM state (H, P, N), in `Mamba2State` (the batch shares positions) or the inference
engine's paged form (one state per sequence slot, like linear attention). A chunk of T > 1
tokens (prefill) runs the chunked scan from the carried state, one token (decode) the recurrent
step; both give the outputs of the full forward.

A `MambaBlock` is ``x + mixer(norm(x))`` with no FFN, as in Mamba-2 and Nemotron-H; hybrid
stacks interleave it with transformer blocks through ``layer_types``. Weight names follow
`transformers`' ``Mamba2ForCausalLM`` (``norm``, ``mixer.in_proj``, ``mixer.conv1d``, ...).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from model.cache import PagedStateCache
from model.config import ModelConfig
from model.norms import GatedRMSNorm, build_norm
from model.ssd import causal_conv1d, conv_state_after, segment_ids, ssd_chunked_scan, ssd_step

A_INIT_RANGE = (1.0, 16.0)  # A = -U[1, 16] per head (Mamba-2's default)
DT_INIT_RANGE = (1e-3, 1e-1)  # softplus(dt_bias) log-uniform in this range, at least DT_FLOOR
DT_FLOOR = 1e-4


@dataclass
class Mamba2State:
    """Recurrent state of one Mamba-2 layer for a batch that shares positions."""

    conv: torch.Tensor  # (B, conv_dim, K-1) the last K-1 conv inputs
    ssm: torch.Tensor  # (B, H, P, N)
    max_seq_len: int  # positions the cache accepts in total (same contract as a KV cache)
    length: int = 0  # tokens consumed so far = position of the next token
    paged = False


def mamba_state_shapes(cfg: ModelConfig) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Per-sequence state shapes of one Mamba-2 layer: conv (conv_dim, K-1), ssm (H, P, N)."""
    conv_dim = cfg.mamba_inner + 2 * cfg.mamba_n_groups * cfg.mamba_state_size
    return (conv_dim, cfg.mamba_conv_kernel - 1), (cfg.mamba_heads, cfg.mamba_head_dim, cfg.mamba_state_size)


class Mamba2Mixer(nn.Module):
    """The SSD mixer: in-projection, causal depthwise conv, SSM scan, gated RMSNorm, out-projection."""

    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.head_dim = cfg.mamba_heads, cfg.mamba_head_dim
        self.n_groups, self.state_size = cfg.mamba_n_groups, cfg.mamba_state_size
        self.inner, self.chunk_size = cfg.mamba_inner, cfg.mamba_chunk_size
        self.conv_dim = self.inner + 2 * self.n_groups * self.state_size
        self.in_proj = nn.Linear(cfg.dim, self.inner + self.conv_dim + self.n_heads, bias=cfg.mamba_proj_bias)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, cfg.mamba_conv_kernel, groups=self.conv_dim,
                                bias=cfg.mamba_conv_bias)  # weight (conv_dim, 1, K); applied by `causal_conv1d`
        self.dt_bias = nn.Parameter(torch.empty(self.n_heads))
        self.A_log = nn.Parameter(torch.empty(self.n_heads))
        self.D = nn.Parameter(torch.empty(self.n_heads))
        self.norm = GatedRMSNorm(self.inner, self.inner // self.n_groups, cfg.norm_eps)
        self.out_proj = nn.Linear(self.inner, cfg.dim, bias=cfg.mamba_proj_bias)

    @torch.no_grad()
    def init_ssm_parameters(self) -> None:
        """Mamba-2's initialisation of what a generic init gets wrong: A, D, dt_bias and the conv."""
        self.A_log.copy_(torch.empty_like(self.A_log, dtype=torch.float32).uniform_(*A_INIT_RANGE).log())
        self.D.fill_(1.0)
        lo, hi = math.log(DT_INIT_RANGE[0]), math.log(DT_INIT_RANGE[1])
        dt = torch.exp(torch.rand_like(self.dt_bias, dtype=torch.float32) * (hi - lo) + lo).clamp(min=DT_FLOOR)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus^-1(dt)
        bound = 1.0 / math.sqrt(self.conv1d.weight.shape[-1])  # nn.Conv1d's own default
        self.conv1d.weight.uniform_(-bound, bound)

    def init_cache(self, batch_size: int, max_seq_len: int, device: torch.device, dtype: torch.dtype) -> Mamba2State:
        """Zero state, kept in ``dtype`` promoted to at least fp32."""
        state_dtype = torch.promote_types(dtype, torch.float32)
        conv = (self.conv_dim, self.conv1d.kernel_size[0] - 1)
        ssm = (self.n_heads, self.head_dim, self.state_size)
        return Mamba2State(conv=torch.zeros(batch_size, *conv, device=device, dtype=state_dtype),
                           ssm=torch.zeros(batch_size, *ssm, device=device, dtype=state_dtype),
                           max_seq_len=max_seq_len)

    def forward(
        self,
        u: torch.Tensor,
        positions: torch.Tensor,
        cache: Optional[Union[Mamba2State, PagedStateCache]] = None,
        doc_ids: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """u (B, T, D), positions (B, T) -> (B, T, D). See the module docstring for the cache."""
        batch, seq_len, _ = u.shape
        z, xbc, dt = self.in_proj(u).split([self.inner, self.conv_dim, self.n_heads], dim=-1)
        conv0 = ssm0 = lengths = None
        if cache is not None:
            if doc_ids is not None:
                raise ValueError("document masking (doc_ids) is only supported without a cache")
            conv0, ssm0 = cache.read_state() if cache.paged else self._continue(cache, int(positions[0, 0]), seq_len)
        seg = segment_ids(doc_ids) if doc_ids is not None else None
        weight = self.conv1d.weight[:, 0]  # (conv_dim, K)
        x, b, c = F.silu(causal_conv1d(xbc, weight, self.conv1d.bias, conv0, seg)).split(
            [self.inner, self.n_groups * self.state_size, self.n_groups * self.state_size], dim=-1)

        work = torch.promote_types(u.dtype, torch.float32)
        dt = F.softplus((dt + self.dt_bias).to(work))  # (B, T, H)
        if cache is not None and cache.paged:
            mask = cache.token_mask  # (B, T) padding after a row's tokens leaves its state alone (dt = 0)
            dt, lengths = dt * mask[..., None], mask.sum(dim=-1)
        A = -torch.exp(self.A_log.to(work))  # (H,)
        x = x.reshape(batch, seq_len, self.n_heads, self.head_dim).to(work)  # (B, T, H, P)
        b = b.reshape(batch, seq_len, self.n_groups, self.state_size).to(work)  # (B, T, G, N)
        c = c.reshape(batch, seq_len, self.n_groups, self.state_size).to(work)  # (B, T, G, N)
        if ssm0 is not None and seq_len == 1:  # decode: the recurrence
            y, ssm1 = ssd_step(ssm0.to(work), x[:, 0], dt[:, 0], A, b[:, 0], c[:, 0])
            y = y[:, None]  # (B, 1, H, P)
        else:
            y, ssm1 = ssd_chunked_scan(x, dt, A, b, c, self.chunk_size, ssm0, seg)  # (B, T, H, P)
        y = y + x * self.D.to(work)[:, None]  # skip connection D x
        if cache is not None:
            conv1 = conv_state_after(xbc, conv0, lengths)
            if cache.paged:
                cache.write_state(conv1, ssm1)
            else:
                cache.conv, cache.ssm = conv1.to(cache.conv.dtype), ssm1.to(cache.ssm.dtype)
        out = self.norm(y.reshape(batch, seq_len, self.inner).to(u.dtype), z)  # (B, T, d_inner)
        return self.out_proj(out)

    @staticmethod
    def _continue(state: Mamba2State, start: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The carried (conv, ssm) state of a contiguous cache, checking the chunk continues it."""
        if start != state.length:
            raise ValueError(f"Mamba-2 state has consumed {state.length} tokens and cannot rewind or skip; "
                             f"got a chunk starting at position {start}")
        if start + seq_len > state.max_seq_len:
            raise ValueError(f"Mamba-2 cache holds {state.max_seq_len} positions, got {start} + {seq_len}")
        state.length += seq_len
        return state.conv, state.ssm


class MambaBlock(nn.Module):
    """One pre-norm Mamba-2 layer: ``x + mixer(norm(x))``."""

    layer_type = "mamba"

    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.norm = build_norm(cfg, cfg.dim)
        self.mixer = Mamba2Mixer(cfg, layer_idx)
        self.dropout = cfg.dropout

    def forward(
        self,
        x: torch.Tensor,
        rope: Any,
        positions: torch.Tensor,
        cache: Optional[Union[Mamba2State, PagedStateCache]] = None,
        doc_ids: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """x (B, T, D) -> (B, T, D); ``rope`` is unused (the block's signature is the transformer block's)."""
        h = self.mixer(self.norm(x), positions, cache, doc_ids)
        if self.dropout > 0:
            h = F.dropout(h, self.dropout, self.training)
        return x + h

    def init_cache(self, batch_size: int, max_seq_len: int, device: torch.device, dtype: torch.dtype) -> Mamba2State:
        return self.mixer.init_cache(batch_size, max_seq_len, device, dtype)
