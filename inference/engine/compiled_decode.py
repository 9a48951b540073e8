"""A compiled decode step: one `torch.compile` graph per batch bucket, the context length symbolic.

A decode step of a small model is mostly per-operator overhead: a few dozen tiny kernels per
layer, each dispatched from Python. Compiling the whole step (embedding -> layers -> head, the
paged-KV write and gather included) with Inductor turns it into a few generated C++ / Triton
kernels around the matrix products, called from one wrapper. Shapes are kept few:

- the batch is padded to the next of `BATCH_BUCKETS` (1, 2, 4, 8, ...) and is static in each
  graph: padding rows decode token 0 at position 0, write their K/V to the scratch block and
  read only it;
- the context is padded to whole blocks (each row gathers its block table padded with the
  scratch block; the mask, built inside the graph from the positions, hides what is not the
  row's) and is a *symbolic* size: one graph serves every length, so no context is padded
  further than its last block. (Static context buckets of 256 slots were measured too: the
  same speed for one stream, half the speed at 16 streams, whose attention and K/V gather then
  cover up to 256 positions where the rows have a few dozen.)

Every batch bucket is compiled once, on first use (its warm-up is paid then and logged), and then
only replayed: no recompilations. Steps outside the buckets (a prefill, a verification of
speculative drafts, a packed chunked-prefill step, more rows than the largest bucket) run the
eager `ModelRunner.forward`, whose outputs the compiled step equals up to float summation order
(tests run the paged-engine scenarios in both modes). Where compilation is unavailable or fails,
the engine logs one warning and stays eager.

This is vLLM's / SGLang's "CUDA graph capture per batch size" idea with Inductor as the compiler
(Ansel et al., 2024, "PyTorch 2: Faster Machine Learning Through Dynamic Python Bytecode
Transformation and Graph Compilation"). On the CPU the weights are frozen into the graph, the
GEMMs autotuned and the wrapper is C++ (`DEFAULT_CPU_OPTIONS`); so only models loaded from disk
are compiled, never a live policy whose weights an optimizer changes.
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


def round_up(n: int, multiple: int) -> int:
    """``n`` rounded up to a multiple of ``multiple``."""
    return -(-n // multiple) * multiple


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
    """Decode steps of ``model`` over ``cache`` through one compiled graph per batch bucket.

    ``supports(rows)`` says whether a batch of `model_runner.Row`s is a decode step it can run;
    ``__call__`` returns their last-token logits (B, V). ``options``: Inductor options (default:
    `CPU_OPTIONS` on the CPU, Inductor's defaults elsewhere).
    """

    def __init__(self, model: Transformer, cache: PagedKVCache, max_model_len: int,
                 options: Optional[dict] = None) -> None:
        self.model, self.cache, self.max_model_len = model, cache, max_model_len
        self.device = cache.device
        if options is None:
            options = dict(CPU_OPTIONS) if self.device.type == "cpu" else {}
        # one graph per batch bucket of the same function: dynamo must not give up after its default 8
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 2 * len(BATCH_BUCKETS))
        # MoE routed experts stay eager (`model.moe`: data-dependent group sizes), a graph break each
        fullgraph = model.cfg.moe is None
        self._compiled: Callable = torch.compile(self._step, fullgraph=fullgraph, options=options)
        self.compiled_buckets: set[int] = set()  # batch buckets compiled so far
        self._slots_key: Optional[tuple] = None  # the last step's (bucket, context, block tables) and slots
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
        return bucket_batch(len(rows)) is not None and max(r.start for r in rows) < self.max_model_len

    @torch.inference_mode()
    def __call__(self, rows: list) -> Optional[torch.Tensor]:
        """Last-token logits (B, V) of a decode step, or None when compilation failed (then disabled)."""
        n, block = len(rows), self.cache.block_size
        batch = bucket_batch(n)
        ctx = round_up(max(r.start for r in rows) + 1, block)
        tables = [r.block_table for r in rows]
        key = (batch, ctx, tuple(map(tuple, tables)))
        if key != self._slots_key:  # block tables change only every block_size tokens of a row
            self._slots_key = key
            self._slots = bucket_slots(tables, batch, ctx, block, self.cache.scratch_block).to(self.device)
            torch._dynamo.mark_dynamic(self._slots, 1)  # the context: a symbolic size, one graph for all
        pad = batch - n  # padding rows: token PAD_TOKEN_ID at position 0 of the scratch block
        tokens = torch.tensor([[r.token_ids[0]] for r in rows] + [[PAD_TOKEN_ID]] * pad, device=self.device)
        positions = torch.tensor([[r.start] for r in rows] + [[0]] * pad, device=self.device)  # (Bb, 1)
        for t in (tokens, positions, self._slots):
            torch._dynamo.mark_static(t, 0)  # the batch bucket: never made dynamic by a second size
        first = batch not in self.compiled_buckets
        if first:
            log.info("compiling the decode step for %d rows (once per batch size bucket)...", batch)
        t0 = time.perf_counter()
        try:
            logits = self._compiled(tokens, positions, self._slots)
        except Exception as exc:  # noqa: BLE001 - any compiler failure: fall back to eager, loudly
            self.disabled = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            log.warning("compiled decoding is off (running eager): torch.compile failed: %s", self.disabled)
            return None
        if first:
            self.compiled_buckets.add(batch)
            log.info("compiled in %.1f s", time.perf_counter() - t0)
        return logits[:n]
