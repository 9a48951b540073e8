"""The paged KV cache of the inference engine: one preallocated block pool, shared by all sequences.

PagedAttention (Kwon et al., 2023, "Efficient Memory Management for Large Language Model
Serving with PagedAttention"): the cache of every layer is a pool of fixed-size blocks of
``block_size`` token slots; a sequence's ``block_table`` (from the block manager) lists its
blocks, block k holding positions [k * block_size, (k + 1) * block_size). Memory is taken a
block at a time, so sequences of any length share one pool without fragmentation, and full
blocks with the same prefix are shared (prefix caching). The pool is sized once, from a memory
budget (`num_blocks_for_budget`), and never grows.

What a layer keeps per token slot:
- MHA / GQA / MQA and sliding window: rotated key and value, each (n_kv_heads, head_dim);
  sliding-window layers keep every block and mask the keys outside the window.
- MLA (DeepSeek-V2): the normalised latent c_kv (kv_lora_rank,) and the rotated shared RoPE key
  (qk_rope_head_dim,); decode steps attend over them in latent space (absorbed projections).
- Linear attention (Katharopoulos et al., 2020): nothing per token; a recurrent state (S, z)
  per sequence slot (``seq.slot``), reset when a chunk starts at position 0. Blocks are then
  only bookkeeping and prefix caching must be off.
- Mamba-2 layers (Dao & Gu, 2024): likewise nothing per token; the last K-1 conv inputs and the
  SSM state (H, P, N) per sequence slot. In a hybrid stack the attention layers keep their blocks.

A model step is described by a `StepBatch` (built once per forward, shared by every layer):
where the new entries go (``write_slots``), which slots each row reads back (``gather_slots``:
positions 0 .. S - 1 of the row, S the longest context of the batch; beyond a row's table,
the scratch block), the positions of the queries and keys and the attention masks. The layer
objects (`PagedKVLayer`, `PagedStateLayer`) follow the paged contract of `model.cache`.
"""
from __future__ import annotations

from functools import cached_property
from typing import Optional, Union

import torch

from inference.engine.block_manager import slot_mapping
from model.cache import KVCache
from model.config import ModelConfig
from model.mamba2 import mamba_state_shapes

CPU_KV_CACHE_MB = 256  # default budget on CPU / MPS: cache memory is the machine's RAM
GPU_KV_CACHE_FRACTION = 0.5  # default budget on CUDA: this fraction of the free memory (weights loaded)


# ---------------------------------------------------------------------------- sizing
def cache_entry_shapes(cfg: ModelConfig) -> list[tuple[int, ...]]:
    """Shapes of what one layer stores per token slot (empty for linear attention)."""
    if cfg.attention_type == "mla":
        return [(cfg.kv_lora_rank,), (cfg.qk_rope_head_dim,)]
    if cfg.attention_type == "linear":
        return []
    return [(cfg.kv_heads, cfg.attn_head_dim), (cfg.kv_heads, cfg.attn_head_dim)]


def kv_bytes_per_token(cfg: ModelConfig, dtype: torch.dtype) -> int:
    """Cache bytes one token takes over all layers (0 for linear attention and Mamba-2 layers)."""
    per_layer = sum(torch.Size(shape).numel() for shape in cache_entry_shapes(cfg))
    kv_layers = sum(cfg.layer_type(i) != "mamba" for i in range(cfg.n_layers))
    return kv_layers * per_layer * torch.empty((), dtype=dtype).element_size()


def recurrent_layers(cfg: ModelConfig) -> Optional[str]:
    """The layers that keep a per-sequence state outside the KV blocks ("linear attention layers",
    "Mamba-2 layers"), or None: such a model can neither share prefixes nor roll back rejected drafts."""
    if cfg.has_mamba:
        return "Mamba-2 layers"
    return "linear attention layers" if cfg.attention_type == "linear" else None


def default_kv_cache_bytes(device: torch.device) -> int:
    """The budget when none is given: half the free accelerator memory on CUDA (call it after the
    weights are loaded), `CPU_KV_CACHE_MB` on CPU and MPS."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * GPU_KV_CACHE_FRACTION)
    return CPU_KV_CACHE_MB * 2**20


def num_blocks_for_budget(budget_bytes: int, bytes_per_token: int, block_size: int) -> int:
    """How many blocks of ``block_size`` tokens fit in ``budget_bytes``."""
    return budget_bytes // (bytes_per_token * block_size)


# ---------------------------------------------------------------------------- one step
def step_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: Optional[int] = None) -> torch.Tensor:
    """(B, 1, T, S) bool, True = attend: key at k_pos visible to query at q_pos when it is not
    padding (k_pos >= 0), not in the future and, with a window, one of the ``window`` latest.

    q_pos: (B, T) query positions; k_pos: (B, S) key positions, -1 = padding.
    """
    q, k = q_pos[:, :, None], k_pos[:, None, :]  # (B, T, 1), (B, 1, S)
    visible = (k >= 0) & (k <= q)
    if window is not None:
        visible = visible & (q - k < window)
    return visible[:, None]


class StepBatch:
    """Where one forward reads and writes the cache: rows that compute ``lens[b]`` new tokens
    from position ``starts[b]``; ``block_tables[b]`` covers the row's positions
    [0, starts[b] + lens[b]), ``state_slots[b]`` is its sequence slot (linear attention) and
    ``scratch_block`` takes the padding's writes.

    Rows are right-padded to T new tokens and S context positions. A padding query repeats its
    row's last position (so it always sees a key: no all-masked row) and writes to the scratch
    block. Tensors are built on first use from the Python lists, so a step builds only what its
    model needs (KV slots, or the linear-attention state slots) and decoding stays cheap.
    """

    def __init__(
        self,
        starts: list[int],
        lens: list[int],
        block_tables: list[list[int]],
        state_slots: list[Optional[int]],
        block_size: int,
        scratch_block: int,
        device: torch.device,
    ) -> None:
        self.starts, self.lens, self.block_tables, self.slots = starts, lens, block_tables, state_slots
        self.block_size, self.scratch_block, self.device = block_size, scratch_block, device
        self.ends = [s + n for s, n in zip(starts, lens)]
        self.batch_size = len(lens)
        self.seq_len, self.ctx = max(lens), max(self.ends)  # T, S
        self.no_padding = all(n == self.seq_len for n in lens) and all(e == self.ctx for e in self.ends)
        self.all_from_start = all(s == 0 for s in starts)  # then the keys are the queries (S == T)
        rows = [[min(s + t, e - 1) for t in range(self.seq_len)] for s, e in zip(starts, self.ends)]
        self.positions = torch.tensor(rows, device=device)  # (B, T) position of each new token
        self._masks: dict = {}

    def _tensor(self, values: list) -> torch.Tensor:
        return torch.tensor(values, device=self.device)

    @cached_property
    def write_slots(self) -> torch.Tensor:  # (B * T,) pool slot of each new token
        scratch = self.scratch_block * self.block_size
        flat = []
        for table, s, n in zip(self.block_tables, self.starts, self.lens):
            flat += slot_mapping(table, self.block_size, s, s + n) + [scratch] * (self.seq_len - n)
        return self._tensor(flat)

    @cached_property
    def contiguous_start(self) -> Optional[int]:
        """First pool slot when the batch is one row whose blocks are consecutive (a single stream
        usually gets them so from the free list): its context is then a slice of the pool."""
        if len(self.starts) != 1:
            return None
        nb = -(-self.ctx // self.block_size)
        table = self.block_tables[0][:nb]
        return table[0] * self.block_size if table == list(range(table[0], table[0] + nb)) else None

    @cached_property
    def gather_slots(self) -> torch.Tensor:  # (B * S,) pool slot of each row's positions 0 .. S - 1
        bs, nb = self.block_size, -(-self.ctx // self.block_size)
        tables = self._tensor([t[:nb] + [self.scratch_block] * (nb - len(t[:nb])) for t in self.block_tables])
        offsets = torch.arange(bs, device=self.device)
        slots = (tables[:, :, None] * bs + offsets).view(len(self.starts), nb * bs)  # (B, nb * bs)
        return slots[:, : self.ctx].reshape(-1)

    @cached_property
    def token_mask(self) -> torch.Tensor:  # (B, T) bool, False for padding
        return torch.arange(self.seq_len, device=self.device) < self._tensor(self.lens)[:, None]

    @cached_property
    def key_positions(self) -> torch.Tensor:  # (B, S), -1 = padding
        idx = torch.arange(self.ctx, device=self.device)
        return torch.where(idx < self._tensor(self.ends)[:, None], idx, -1)

    @cached_property
    def state_slots(self) -> torch.Tensor:  # (B,) the rows' sequence slots (linear-attention state)
        return self._tensor([s if s is not None else 0 for s in self.slots])

    @cached_property
    def fresh(self) -> torch.Tensor:  # (B,) bool, the row's chunk starts at position 0 (state reset)
        return self._tensor([s == 0 for s in self.starts])

    def mask(self, window: Optional[int] = None, force: bool = False) -> tuple[Optional[torch.Tensor], bool]:
        """The attention mask of this step for layers with ``window`` (None = full attention),
        built once and shared by the layers; `model.attention.build_mask`'s fast answers
        ``(None, False)`` (every key visible) / ``(None, True)`` (plain causal) where exact."""
        if not force and self.no_padding and (window is None or self.ctx <= window):
            if self.seq_len == 1:
                return None, False
            if self.all_from_start:
                return None, True
        key = (window, force)
        if key not in self._masks:
            self._masks[key] = step_mask(self.positions, self.key_positions, window)
        return self._masks[key], False


class PackedStepBatch:
    """A `StepBatch` whose rows are packed into one row, without padding: the N = sum(lens) new
    tokens side by side (1, N), each row's context 0 .. ends[b] - 1 gathered side by side (1, S),
    S = sum(ends), and a mask that lets a query see only its own row's keys. A decode step's
    one-token rows and a prefill chunk then share one forward (chunked prefill: the weights are
    read once), at the cost of attention scores across rows that the mask throws away. For
    attention layers with a KV pool only (no linear-attention or SSM state).
    """

    def __init__(self, starts: list[int], lens: list[int], block_tables: list[list[int]], block_size: int,
                 device: torch.device) -> None:
        self.lens, self.device = lens, device
        ends = [s + n for s, n in zip(starts, lens)]
        self.batch_size, self.seq_len, self.ctx = 1, sum(lens), sum(ends)  # 1, N, S
        self.contiguous_start = None
        new_pos = [p for s, e in zip(starts, ends) for p in range(s, e)]
        self.positions = torch.tensor([new_pos], device=device)  # (1, N)
        self.write_slots = torch.tensor([x for t, s, e in zip(block_tables, starts, ends)
                                         for x in slot_mapping(t, block_size, s, e)], device=device)  # (N,)
        self.gather_slots = torch.tensor([x for t, e in zip(block_tables, ends)
                                          for x in slot_mapping(t, block_size, 0, e)], device=device)  # (S,)
        self.key_positions = torch.tensor([[p for e in ends for p in range(e)]], device=device)  # (1, S)
        self._q_rows = torch.tensor([b for b, n in enumerate(lens) for _ in range(n)], device=device)  # (N,)
        self._k_rows = torch.tensor([b for b, e in enumerate(ends) for _ in range(e)], device=device)  # (S,)
        self._masks: dict = {}

    def mask(self, window: Optional[int] = None, force: bool = False) -> tuple[Optional[torch.Tensor], bool]:
        """(1, 1, N, S) bool: a query sees its own row's keys up to its position (and within ``window``)."""
        if window not in self._masks:
            same_row = self._q_rows[:, None] == self._k_rows[None, :]  # (N, S)
            self._masks[window] = step_mask(self.positions, self.key_positions, window) & same_row
        return self._masks[window], False


# ---------------------------------------------------------------------------- layer caches
class PagedKVLayer:
    """One layer's pools (num_slots, *entry) (k and v, or MLA's c_kv and k_pe); paged contract."""

    paged = True

    def __init__(self, owner: "PagedKVCache", pools: list[torch.Tensor]) -> None:
        self.owner = owner
        self.pools = pools

    def update(self, positions: torch.Tensor, *new: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Write ``new`` (each (B, T, *entry)) at the step's slots; return (B, S, *entry) gathers."""
        step = self.owner.step
        start = step.contiguous_start
        out = []
        for pool, x in zip(self.pools, new):
            pool.index_copy_(0, step.write_slots, x.reshape(-1, *pool.shape[1:]))
            if start is not None:  # one row in consecutive blocks: a view, no copy
                context = pool[start : start + step.ctx]
            else:
                context = pool.index_select(0, step.gather_slots)
            out.append(context.view(step.batch_size, step.ctx, *pool.shape[1:]))
        return tuple(out)

    @property
    def key_positions(self) -> torch.Tensor:
        return self.owner.step.key_positions

    def mask(self, window: Optional[int] = None, force: bool = False) -> tuple[Optional[torch.Tensor], bool]:
        return self.owner.step.mask(window, force)


class PagedStateLayer:
    """One recurrent layer's state tensors, each (slots, ...) with one entry per sequence slot:
    linear attention's S (H, d, d) and z (H, d), or a Mamba-2 layer's conv (C, K-1) and ssm (H, P, N)."""

    paged = True

    def __init__(self, owner: "PagedKVCache", *states: torch.Tensor) -> None:
        self.owner = owner
        self.states = states

    @property
    def token_mask(self) -> torch.Tensor:
        return self.owner.step.token_mask

    def read_state(self) -> tuple[torch.Tensor, ...]:
        """Each row's states (B, ...); zero for rows whose chunk starts at position 0."""
        step = self.owner.step
        out = []
        for state in self.states:
            keep = (~step.fresh).to(state.dtype).view(-1, *[1] * (state.dim() - 1))  # (B, 1, ...)
            out.append(state[step.state_slots] * keep)
        return tuple(out)

    def write_state(self, *new: torch.Tensor) -> None:
        step = self.owner.step
        for state, x in zip(self.states, new):
            state.index_copy_(0, step.state_slots, x.to(state.dtype))


class PagedKVCache(KVCache):
    """The whole model's paged cache: ``num_blocks`` blocks (+ 1 scratch block for padding writes)
    of ``block_size`` slots in every attention layer, and per-slot recurrent states for linear
    attention and Mamba-2 layers.

    ``begin_step`` sets the current `StepBatch` before each forward.
    """

    paged = True

    def __init__(
        self,
        cfg: ModelConfig,
        num_blocks: int,
        block_size: int,
        max_num_seqs: int,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        self.num_blocks, self.block_size, self.device = num_blocks, block_size, device
        self.scratch_block = num_blocks  # padding tokens write here; never part of a block table
        self.step: Optional[Union[StepBatch, PackedStepBatch]] = None
        num_slots = (num_blocks + 1) * block_size
        self.bytes_per_token = kv_bytes_per_token(cfg, dtype)
        state_dtype = torch.promote_types(dtype, torch.float32)
        hd = cfg.attn_head_dim
        layers: list = []
        for i in range(cfg.n_layers):
            if cfg.layer_type(i) == "mamba":
                shapes = mamba_state_shapes(cfg)
            elif cfg.attention_type == "linear":
                shapes = ((cfg.n_heads, hd, hd), (cfg.n_heads, hd))
            else:  # attention: K/V (or MLA's latent) entries per token slot of the block pool
                entries = cache_entry_shapes(cfg)
                pools = [torch.zeros(num_slots, *shape, device=device, dtype=dtype) for shape in entries]
                layers.append(PagedKVLayer(self, pools))
                continue
            states = [torch.zeros(max_num_seqs, *shape, device=device, dtype=state_dtype) for shape in shapes]
            layers.append(PagedStateLayer(self, *states))
        super().__init__(layers)

    @property
    def allocated_bytes(self) -> int:
        """Bytes of every pool and state tensor (the scratch block included)."""
        total = 0
        for layer in self.layers:
            tensors = layer.pools if isinstance(layer, PagedKVLayer) else layer.states
            total += sum(t.numel() * t.element_size() for t in tensors)
        return total

    def begin_step(
        self, starts: list[int], lens: list[int], block_tables: list[list[int]], state_slots: list[Optional[int]],
        packed: bool = False,
    ) -> Union[StepBatch, PackedStepBatch]:
        """Describe the next forward (a `StepBatch`, or a `PackedStepBatch` when ``packed``) and make
        it the current step."""
        if packed:
            self.step = PackedStepBatch(starts, lens, block_tables, self.block_size, self.device)
        else:
            self.step = StepBatch(starts, lens, block_tables, state_slots, self.block_size, self.scratch_block,
                                  self.device)
        return self.step
