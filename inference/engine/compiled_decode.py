"""A compiled decode step with static shapes: one `torch.compile` graph per (batch, context) bucket.

A decode step of a small model is mostly per-operator overhead: a few dozen tiny kernels per
layer, each dispatched from Python. Compiling the whole step (embedding -> layers -> head, the
paged-KV write and gather included) with Inductor turns it into a few generated C++ / Triton
kernels around the matrix products, called from one wrapper. Compiled code wants static shapes,
so a step is padded to a *bucket*:

- the batch to the next of `BATCH_BUCKETS` (1, 2, 4, 8, ...): padding rows decode token 0 at
  position 0, write their K/V to the scratch block and read only it;
- the context to the next multiple of ``ctx_bucket`` slots: each row gathers its block table
  padded with the scratch block, and the mask (built inside the graph from the key positions,
  -1 beyond a row's end) hides what is not the row's.

Every bucket is compiled once, on first use (its warm-up is paid then and logged), and then only
replayed: the shapes never change within a bucket, so there are no recompilations. Shapes
outside the buckets (a prefill, a verification of speculative drafts, a packed chunked-prefill
step, more rows than the largest bucket) run the eager `ModelRunner.forward`, whose outputs the
compiled step equals up to float summation order (tests run the paged-engine tests in both
modes). Where compilation is unavailable or fails, the engine logs one warning and stays eager.

This is vLLM's / SGLang's "CUDA graph capture per batch size" idea, with Inductor as the
compiler; on the CPU, ``cpp_wrapper`` removes the Python wrapper too (Ansel et al., 2024,
"PyTorch 2: Faster Machine Learning Through Dynamic Python Bytecode Transformation and Graph
Compilation").
"""
from __future__ import annotations

import logging
import time
from typing import Callable, Optional

import torch

from inference.engine.paged_cache import PagedKVCache, PagedKVLayer, step_mask
from model.transformer import Transformer

log = logging.getLogger(__name__)

BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)
DEFAULT_CTX_BUCKET = 256  # context slots are padded to a multiple of this (a multiple of the block size)
PAD_TOKEN_ID = 0
# on the CPU: weights frozen into the graph (constants, prepacked), GEMMs autotuned between Inductor's
# C++ micro-kernels and ATen, the wrapper in C++ (no Python between kernels)
DEFAULT_CPU_OPTIONS = {"freezing": True, "max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN",
               "cpp_wrapper": True}
CPU_OPTIONS = DEFAULT_CPU_OPTIONS


def show_compile_progress() -> None:
    """Print this module's info lines (each bucket's compilation, before and after) to stderr: the
    command-line tools call it with ``--compile``, so a first step's wait is explained."""
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
    log.setLevel(logging.INFO)


def bucket_batch(batch: int) -> Optional[int]:
    """The smallest batch bucket that holds ``batch`` rows (None: more than the largest)."""
    return next((b for b in BATCH_BUCKETS if b >= batch), None)


def bucket_ctx(ctx: int, ctx_bucket: int) -> int:
    """``ctx`` rounded up to a multiple of ``ctx_bucket``."""
    return -(-ctx // ctx_bucket) * ctx_bucket


class StaticStep:
    """What one compiled decode step reads and writes (the `paged_cache.StepBatch` contract for one
    new token per row), derived inside the graph from two bucket-shaped inputs:

    positions (Bb, 1), the position each row writes; slots (Bb, Sb), the pool slot of each row's
    positions 0 .. Sb - 1. Row b writes slot slots[b, positions[b]], gathers all of slots[b] and
    sees the keys at positions <= positions[b] (within a sliding window where the layer has one).
    """

    contiguous_start = None
    seq_len = 1

    def __init__(self, positions: torch.Tensor, slots: torch.Tensor) -> None:
        self.positions = positions  # (Bb, 1)
        self.batch_size, self.ctx = slots.shape
        self.write_slots = slots.gather(1, positions).view(-1)  # (Bb,)
        self.gather_slots = slots.reshape(-1)  # (Bb * Sb,)
        idx = torch.arange(self.ctx, device=slots.device)
        self.key_positions = torch.where(idx <= positions, idx, -1)  # (Bb, Sb), -1 = not a key of the row

    def mask(self, window: Optional[int] = None, force: bool = False) -> tuple[torch.Tensor, bool]:
        """(Bb, 1, 1, Sb) bool: always an explicit mask (rows of different lengths share a bucket)."""
        return step_mask(self.positions, self.key_positions, window), False


def bucket_slots(block_tables: list[list[int]], batch: int, ctx: int, block_size: int,
                 scratch_block: int) -> torch.Tensor:
    """(batch, ctx) pool slots of each row's positions 0 .. ctx - 1: its block table, padded with the
    scratch block (rows beyond len(block_tables) are all scratch: padding rows write there and, at
    position 0, see only that one key, never an all-masked row). ``ctx`` a multiple of ``block_size``."""
    nb = ctx // block_size
    tables = torch.full((batch, nb), scratch_block, dtype=torch.long)  # (Bb, nb)
    for b, table in enumerate(block_tables):
        used = table[:nb]
        tables[b, : len(used)] = torch.tensor(used, dtype=torch.long)
    return (tables[:, :, None] * block_size + torch.arange(block_size)).view(batch, ctx)


class CompiledDecode:
    """Decode steps of ``model`` over ``cache`` through one compiled graph per bucket.

    ``supports(rows)`` says whether a batch of `model_runner.Row`s is a decode step it can run;
    ``__call__`` returns their last-token logits (B, V). ``options``: Inductor options
    (default: ``cpp_wrapper`` on the CPU).
    """

    def __init__(self, model: Transformer, cache: PagedKVCache, max_model_len: int,
                 ctx_bucket: int = DEFAULT_CTX_BUCKET, options: Optional[dict] = None) -> None:
        block = cache.block_size
        # whole blocks, and no larger than the longest context
        ctx_bucket = min(bucket_ctx(ctx_bucket, block), bucket_ctx(max_model_len, block))
        self.model, self.cache, self.ctx_bucket = model, cache, ctx_bucket
        self.max_ctx = bucket_ctx(max_model_len, ctx_bucket)
        self.device = cache.device
        if options is None:
            options = dict(CPU_OPTIONS) if self.device.type == "cpu" else {}
        # one graph per bucket of the same function: dynamo must not give up after its default 8
        limit = len(BATCH_BUCKETS) * (self.max_ctx // ctx_bucket)
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, limit)
        # MoE routed experts stay eager (`model.moe`: data-dependent group sizes), a graph break each
        fullgraph = model.cfg.moe is None
        self._compiled: Callable = torch.compile(self._step, dynamic=False, fullgraph=fullgraph, options=options)
        self.compiled_buckets: set[tuple[int, int]] = set()
        self._slots_key: Optional[tuple] = None  # the last step's (bucket, block tables) and their slots
        self._slots = torch.empty(0)
        self.disabled: Optional[str] = None  # why compiled decoding was turned off

    @staticmethod
    def applies_to(model: Transformer, cache: PagedKVCache) -> Optional[str]:
        """None when every layer keeps its K/V in the block pool, else why the step cannot be compiled."""
        if not all(isinstance(layer, PagedKVLayer) for layer in cache.layers):
            return "recurrent layers (linear attention, Mamba-2) keep per-sequence state"
        if model.cfg.position_type == "alibi":
            return "ALiBi biases are built per row"
        return None

    def _step(self, tokens: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """tokens (Bb, 1), positions (Bb, 1), slots (Bb, Sb) -> logits (Bb, V): the compiled graph."""
        self.cache.step = StaticStep(positions, slots)
        hidden = self.model.forward_hidden(tokens, positions, self.cache)  # (Bb, 1, D)
        return self.model.head(self.model.norm(hidden[:, 0]))  # (Bb, V)

    def supports(self, rows: list) -> bool:
        if self.disabled is not None or not rows or any(len(r.token_ids) != 1 for r in rows):
            return False
        return bucket_batch(len(rows)) is not None and max(r.start for r in rows) < self.max_ctx

    @torch.inference_mode()
    def __call__(self, rows: list) -> Optional[torch.Tensor]:
        """Last-token logits (B, V) of a decode step, or None when compilation failed (then disabled)."""
        n = len(rows)
        batch = bucket_batch(n)
        ctx = bucket_ctx(max(r.start for r in rows) + 1, self.ctx_bucket)
        tables = [r.block_table for r in rows]
        key = (batch, ctx, tuple(map(tuple, tables)))
        if key != self._slots_key:  # block tables change only every block_size tokens of a row
            self._slots_key = key
            self._slots = bucket_slots(tables, batch, ctx, self.cache.block_size,
                                       self.cache.scratch_block).to(self.device)
        pad = batch - n  # padding rows: token PAD_TOKEN_ID at position 0 of the scratch block
        tokens = torch.tensor([[r.token_ids[0]] for r in rows] + [[PAD_TOKEN_ID]] * pad, device=self.device)
        positions = torch.tensor([[r.start] for r in rows] + [[0]] * pad, device=self.device)  # (Bb, 1)
        first = (batch, ctx) not in self.compiled_buckets
        if first:
            log.info("compiling the decode step for %d rows x %d context slots (once per bucket)...", batch, ctx)
        t0 = time.perf_counter()
        try:
            logits = self._compiled(tokens, positions, self._slots)
        except Exception as exc:  # noqa: BLE001 - any compiler failure: fall back to eager, loudly
            self.disabled = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            log.warning("compiled decoding is off (running eager): torch.compile failed: %s", self.disabled)
            return None
        if first:
            self.compiled_buckets.add((batch, ctx))
            log.info("compiled in %.1f s", time.perf_counter() - t0)
        return logits[:n]
