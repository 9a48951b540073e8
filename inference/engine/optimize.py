"""Load-time rewrites that make a loaded model decode faster; the outputs stay the model's.

- Fused projections: each attention layer's q, k and v come from one matmul (``qkv_proj``), each
  GLU feed-forward's gate and up from one (``gate_up_proj``): decoding a token is dominated by
  small matrix-vector products, and three (two) kernel calls become one over the same bytes.
  Exact up to float summation order.
- Transposed weights on the CPU (`TransposedLinear`): a linear stores its weight as (in, out),
  contiguous, and computes ``x @ W^T`` as a plain ``x @ weight_t``. For the one-row products of
  decoding, torch's CPU matmul streams a (in, out) matrix much faster than it reads (out, in)
  through a transposed view (config B, one stream: about 1.35x tokens/s; a 8192 x 512 head 3x).
  Exact up to float summation order.
- ``quantize="int8"``: weight-only int8 (`model.int8`), a quarter of the fp32 weight bytes read
  per token, through torch's packed int8 CPU kernel; a model or device it does not cover is a
  `UserError` (one line).

Only models the engine loads itself are rewritten: a model shared with a trainer (RL rollouts
pass the live policy) keeps its parameters, which the optimizer updates in place.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from model.attention import Attention
from model.config import ModelConfig
from model.ffn import FeedForward
from model.int8 import int8_unsupported, quantize_int8
from model.transformer import Block, Transformer
from utils.errors import UserError

QUANTIZE_CHOICES = ("int8",)


def check_quantize(quantize: Optional[str], cfg: ModelConfig, device: torch.device) -> None:
    """UserError (one line) when ``quantize`` is unknown or does not fit the model / device."""
    if quantize is None:
        return
    if quantize not in QUANTIZE_CHOICES:
        raise UserError(f"--quantize {quantize!r} is not supported (choose from: {', '.join(QUANTIZE_CHOICES)})")
    why = int8_unsupported(cfg, device)
    if why is not None:
        raise UserError(why)


class TransposedLinear(nn.Module):
    """A frozen linear holding its weight transposed, (in, out) contiguous: y = x @ weight_t + bias."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight_t = nn.Parameter(linear.weight.detach().t().contiguous(), requires_grad=False)  # (in, out)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)

    @property
    def weight(self) -> torch.Tensor:  # (out, in), a view: for code that reads a projection's matrix
        return self.weight_t.t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out)
        y = x @ self.weight_t
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def transpose_linears(model: nn.Module) -> nn.Module:
    """Replace every ``nn.Linear`` of ``model`` by a `TransposedLinear`, in place; returns the model."""
    for name, child in list(model.named_children()):
        if isinstance(child, nn.Linear):
            setattr(model, name, TransposedLinear(child))
        else:
            transpose_linears(child)
    return model


def fuse_projections(model: Transformer) -> Transformer:
    """Stack q/k/v and gate/up of every transformer block in place (see the module docstring)."""
    for block in model.layers:
        if isinstance(block, Block):
            if isinstance(block.attn, Attention):
                block.attn.fuse_projections()
            if isinstance(block.ffn, FeedForward):
                block.ffn.fuse_projections()
    return model


def optimize_for_inference(model: Transformer, quantize: Optional[str] = None, rewrite: bool = True) -> Transformer:
    """Fuse the projections (``rewrite``), quantize (int8) when asked, and on the CPU transpose the
    remaining floating-point linears (``rewrite``); in place, returns the model."""
    if rewrite:
        fuse_projections(model)
    if quantize == "int8":
        quantize_int8(model)
    if rewrite and next(model.parameters()).device.type == "cpu":
        transpose_linears(model)
    return model
