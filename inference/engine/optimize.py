"""Load-time rewrites that make a loaded model decode faster; the outputs stay the model's.

- Fused projections: each attention layer's q, k and v come from one matmul (``qkv_proj``), each
  GLU feed-forward's gate and up from one (``gate_up_proj``): decoding a token is dominated by
  small matrix-vector products, and three (two) kernel calls become one over the same bytes.
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


def fuse_projections(model: Transformer) -> Transformer:
    """Stack q/k/v and gate/up of every transformer block in place (see the module docstring)."""
    for block in model.layers:
        if isinstance(block, Block):
            if isinstance(block.attn, Attention):
                block.attn.fuse_projections()
            if isinstance(block.ffn, FeedForward):
                block.ffn.fuse_projections()
    return model


def optimize_for_inference(model: Transformer, quantize: Optional[str] = None) -> Transformer:
    """Fuse the projections, then quantize (int8) when asked; in place, returns the model."""
    fuse_projections(model)
    if quantize == "int8":
        quantize_int8(model)
    return model
