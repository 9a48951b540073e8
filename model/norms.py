"""Normalisation layers: RMSNorm, Gemma's (1 + w) RMSNorm and LayerNorm.

- RMSNorm: Zhang & Sennrich 2019, "Root Mean Square Layer Normalization". Normalised in
  fp32, cast back to the input dtype, then scaled by the weight (the Llama order).
- GemmaRMSNorm: Gemma (Team Gemma 2024) stores ``w`` and scales by ``(1 + w)``; the whole
  computation, scaling included, runs in fp32 and is cast back once at the end.
- LayerNorm: Ba et al. 2016, "Layer Normalization" (weight and bias).
- GatedRMSNorm: Mamba-2's output norm (Dao & Gu 2024), RMSNorm of ``y * silu(z)`` taken over
  groups of channels, in fp32.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.config import ModelConfig


class RMSNorm(nn.Module):
    """y = w * (x / sqrt(mean(x^2) + eps)), statistics in fp32."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.dim = dim
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., dim) -> (..., dim)
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.rms_norm(x, (self.dim,), self.weight, self.eps)  # one fused kernel
        # low precision: normalise in fp32, round to the input dtype, then scale (Llama / HF order)
        return self.weight * F.rms_norm(x.float(), (self.dim,), eps=self.eps).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}"


class GemmaRMSNorm(nn.Module):
    """y = (x / sqrt(mean(x^2) + eps)) * (1 + w), all in fp32; ``w`` is zero-initialised."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.dim = dim
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., dim) -> (..., dim)
        normed = F.rms_norm(x.float(), (self.dim,), eps=self.eps)
        return (normed * (1.0 + self.weight.float())).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}"


class LayerNorm(nn.LayerNorm):
    """Standard LayerNorm with a learned weight and bias."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__(dim, eps=eps)


class GatedRMSNorm(nn.Module):
    """y = w * rmsnorm(x * silu(z)), the statistics taken per group of ``group_size`` channels."""

    def __init__(self, dim: int, group_size: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.dim, self.group_size, self.eps = dim, group_size, eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:  # (..., dim), (..., dim) -> (..., dim)
        h = x.float() * F.silu(z.float())
        groups = h.view(*h.shape[:-1], self.dim // self.group_size, self.group_size)  # (..., G, dim / G)
        h = F.rms_norm(groups, (self.group_size,), eps=self.eps).view(h.shape)
        return self.weight * h.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.dim}, group_size={self.group_size}, eps={self.eps}"


NORM_TYPES = (RMSNorm, GemmaRMSNorm, LayerNorm, GatedRMSNorm)


def build_norm(cfg: ModelConfig, dim: int) -> nn.Module:
    """The norm selected by ``cfg.norm_type`` over a last dimension of size ``dim``."""
    if cfg.norm_type == "rmsnorm":
        return RMSNorm(dim, cfg.norm_eps)
    if cfg.norm_type == "gemma_rmsnorm":
        return GemmaRMSNorm(dim, cfg.norm_eps)
    return LayerNorm(dim, cfg.norm_eps)
