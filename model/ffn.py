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

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

FFN_TYPES = ("swiglu", "geglu", "gelu")


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (..., dim)
        if self.is_glu:
            h = self.act(self.gate_proj(x)) * self.up_proj(x)  # (..., hidden)
        else:
            h = self.act(self.up_proj(x))  # (..., hidden)
        return self.down_proj(h)  # (..., dim)
