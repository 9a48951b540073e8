"""`training.compile`: torch.compile one transformer block at a time (regional compilation).

Each block of the main stack (`model.transformer.Block`, `model.mamba2.MambaBlock`) is compiled
on its own, as torchtitan does, instead of the whole model at once:

* identical blocks share one compiled graph (dynamo caches by code and guards), so compile time
  does not grow with depth, and a model with dense and MoE layers compiles two kinds of block;
* the data-dependent parts stay out of the graphs: a MoE layer's routed-expert dispatch (group
  sizes change every step) is `torch.compiler.disable`d in `model.moe`, so no step recompiles;
* the embedding, the head, the MTP modules and the loss run eagerly, and so does every
  forward outside training (validation, sample generations, RL rollouts with their KV cache),
  which saves compiling the blocks again for each of those modes.

DDP and FSDP2 wrap the model around the same blocks, so this works under both. If the first
step fails to compile, `uncompile_blocks` returns the blocks to eager and training goes on.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from model.transformer import BLOCK_TYPES


def compile_blocks(model: nn.Module, backend: str = "inductor") -> list[nn.Module]:
    """Compile every transformer block of ``model`` for its training forwards; returns the blocks.

    A block runs its compiled forward only while it is training with gradients on; evaluation,
    sample generation and RL rollouts (eval mode, no grad, a KV cache) stay eager, so they never
    trigger a second compile of the same blocks for another mode.
    """
    # the main stack only: an MTP module's block runs on T - k positions, and sharing Block.forward's
    # compiled code with it would turn every block's graphs dynamic-shaped (slower, recompiled)
    blocks = [m for name, m in model.named_modules() if isinstance(m, BLOCK_TYPES) and ".mtp." not in f".{name}."]
    for block in blocks:
        eager = block.forward
        compiled = torch.compile(eager, backend=backend)

        def forward(*args: Any, _block: nn.Module = block, _eager: Callable = eager, _compiled: Callable = compiled,
                    **kwargs: Any) -> Any:
            run = _compiled if _block.training and torch.is_grad_enabled() else _eager
            return run(*args, **kwargs)

        block.forward = forward  # an instance attribute: nn.Module.__call__ finds it first
    return blocks


def uncompile_blocks(blocks: list[nn.Module]) -> None:
    """Back to eager: remove the instance ``forward`` that `compile_blocks` installed."""
    for block in blocks:
        block.__dict__.pop("forward", None)
