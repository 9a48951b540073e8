"""Weight-only int8 linear layers for CPU inference (torch's packed int8 kernel).

Each output row of a weight matrix is stored as int8 with one scale, symmetric absmax
(w ≈ scale_n * q_nk, q in [-127, 127]); activations stay in floating point. The matmul is
``torch.ops.aten._weight_int8pack_mm``, the CPU kernel of torch's weight-only int8 (as in
gpt-fast / torchao's ``int8_weight_only``), which takes bf16 activations and scales: a layer
casts its input to bf16 and its output back. Decoding reads a quarter of the fp32 weight bytes.

`quantize_int8` swaps every ``nn.Linear`` of a model for an `Int8Linear` in place, except those
whose input width is not a multiple of 16 (the kernel's granularity; they stay in floating
point, as llama.cpp keeps such rows in f16); the input embedding and a head tied to it stay in
floating point too. `int8_unsupported` names what cannot
be quantized this way (one line), or returns None.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from model.config import ModelConfig

INT8_MAX = 127
K_MULTIPLE = 16  # the packed kernel needs the input width in multiples of 16


class Int8Linear(nn.Module):
    """A frozen linear with int8 weights (N, K), bf16 per-row scales (N,) and the original bias."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w = linear.weight.detach().float()  # (N, K)
        scale = w.abs().amax(dim=1).clamp_min(1e-12) / INT8_MAX  # (N,)
        self.register_buffer("weight_int8", torch.round(w / scale[:, None]).clamp(-INT8_MAX, INT8_MAX).to(torch.int8))
        self.register_buffer("scales", scale.to(torch.bfloat16))
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., K) -> (..., N)
        flat = x.reshape(-1, self.in_features).to(torch.bfloat16)  # (M, K)
        y = torch.ops.aten._weight_int8pack_mm(flat, self.weight_int8, self.scales)  # (M, N) bf16
        y = y.to(x.dtype).view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def int8_unsupported(cfg: ModelConfig, device: torch.device) -> Optional[str]:
    """Why a model of ``cfg`` on ``device`` cannot run weight-only int8 (None when it can)."""
    if device.type != "cpu":
        return f"--quantize int8 runs on the CPU only (torch's packed int8 kernel), not on {device.type}"
    if cfg.moe is not None:
        return f"--quantize int8 does not cover {cfg.family}'s stacked MoE experts (only dense linear layers)"
    if cfg.attention_type == "mla":
        return f"--quantize int8 does not cover {cfg.family}'s MLA (its absorbed decode reads kv_b_proj's full matrix)"
    return None


def quantize_int8(model: nn.Module) -> nn.Module:
    """Replace every ``nn.Linear`` of ``model`` by an `Int8Linear`, in place; returns the model."""
    for name, child in list(model.named_children()):
        if isinstance(child, nn.Linear) and child.in_features % K_MULTIPLE == 0:
            setattr(model, name, Int8Linear(child))
        elif not isinstance(child, nn.Linear):
            quantize_int8(child)
    return model
