"""Position-wise feed-forward networks.

- ``swiglu``: ``down(silu(gate(x)) * up(x))`` — GLU variants, Shazeer 2020
  ("GLU Variants Improve Transformer"); used by Llama, Qwen, Mistral, DeepSeek.
- ``geglu``: ``down(gelu_tanh(gate(x)) * up(x))`` — same paper; Gemma uses the tanh
  approximation of GELU (``gelu_pytorch_tanh`` in Hugging Face configs).
- ``gelu``: the classic two-layer MLP ``down(gelu_tanh(up(x)))`` (Vaswani et al. 2017 with
  the GELU of Hendrycks & Gimpel 2016, as in GPT-2).

``glu_activation`` is shared with the stacked experts of ``model.moe``.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

FFN_TYPES = ("swiglu", "geglu", "gelu")


def stack_linears(linears: list[nn.Linear]) -> nn.Linear:
    """One frozen linear whose output is the given linears' outputs concatenated (same input)."""
    first = linears[0]
    has_bias = first.bias is not None
    fused = nn.Linear(first.in_features, sum(m.out_features for m in linears), bias=has_bias,
                      device=first.weight.device, dtype=first.weight.dtype)
    fused.weight = nn.Parameter(torch.cat([m.weight.detach() for m in linears]), requires_grad=False)
    if has_bias:
        fused.bias = nn.Parameter(torch.cat([m.bias.detach() for m in linears]), requires_grad=False)
    return fused


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU with the tanh approximation (HF ``gelu_pytorch_tanh`` / ``gelu_new``)."""
    return F.gelu(x, approximate="tanh")


def glu_activation(ffn_type: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The non-linearity of ``ffn_type``: applied to the gate branch (GLU types) or to up (gelu)."""
    if ffn_type == "swiglu":
        return F.silu
    if ffn_type in ("geglu", "gelu"):
        return gelu_tanh
    raise ValueError(f"ffn_type must be one of {FFN_TYPES}, got {ffn_type!r}")


class FeedForward(nn.Module):
    """Dense FFN: ``gate_proj``/``up_proj``/``down_proj`` (GLU types) or ``up_proj``/``down_proj`` (gelu)."""

    def __init__(self, dim: int, hidden_dim: int, ffn_type: str, bias: bool = False):
        super().__init__()
        self.ffn_type = ffn_type
        self.act = glu_activation(ffn_type)
        self.is_glu = ffn_type != "gelu"
        if self.is_glu:
            self.gate_proj = nn.Linear(dim, hidden_dim, bias=bias)
        self.up_proj = nn.Linear(dim, hidden_dim, bias=bias)
        self.down_proj = nn.Linear(hidden_dim, dim, bias=bias)
        self.gate_up_proj: Optional[nn.Linear] = None  # gate and up stacked: set by `fuse_projections`

    def fuse_projections(self) -> None:
        """For inference (GLU types): gate and up from one matmul, ``gate_up_proj`` holding both
        weights stacked (2 * hidden rows); gate_proj / up_proj are dropped."""
        if self.is_glu:
            self.gate_up_proj = stack_linears([self.gate_proj, self.up_proj])
            self.gate_proj = self.up_proj = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (..., dim)
        if self.gate_up_proj is not None:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)  # (..., hidden) each
            h = self.act(gate) * up
        elif self.is_glu:
            h = self.act(self.gate_proj(x)) * self.up_proj(x)  # (..., hidden)
        else:
            h = self.act(self.up_proj(x))  # (..., hidden)
        return self.down_proj(h)  # (..., dim)
