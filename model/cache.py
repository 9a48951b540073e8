"""Inference caches: what each attention layer keeps between calls.

The model-level `KVCache` is a list of per-layer cache objects, each created by its attention
module's ``init_cache(batch_size, max_seq_len, device, dtype)``, plus the number of tokens
seen so far (``length``). Attention modules only talk to their own layer cache, so another
cache (the paged cache of the inference engine) plugs in by providing layer objects that
follow the paged contract below.

Layer caches here are contiguous: fixed buffers (B, max_seq_len, ...) in which a call writes
its T new entries at slots ``start .. start + T - 1`` (the tokens' positions, shared by all
rows of the batch) and reads back every slot up to the furthest one written:

- `KVLayerCache` (MHA / GQA / MQA, Vaswani et al. 2017; Shazeer 2019; Ainslie et al. 2023):
  rotated keys and values (B, max_len, n_kv, hd). Sliding-window layers keep the full length
  and the attention masks (and slices) it to the window.
- `LatentLayerCache` (MLA, DeepSeek-V2, Liu et al. 2024): only the normalised latent
  ``c_kv`` (B, max_len, kv_lora_rank) and the shared, already rotated RoPE key ``k_pe``
  (B, max_len, qk_rope_head_dim).

Paged layer caches (``paged = True``; the inference engine's, `inference/engine/paged_cache.py`,
after PagedAttention, Kwon et al. 2023) serve batches whose rows sit at their own positions
(continuous batching). Their contract, `PagedLayerCache`: ``update(positions (B, T), *new)``
stores the new entries and returns each row's whole context gathered from the block pool,
padded per row to a common length S, entry j of a row holding position j; ``key_positions``
(B, S) says so (-1 marks padding); ``mask(window, force)`` gives the attention mask of the
step (causal by position, sliding window, padding), shared by all layers. The form of linear
attention and Mamba-2 layers, `PagedStateCache`, keeps one recurrent state per sequence.
"""
from __future__ import annotations

from typing import Any, Optional, Protocol, Sequence

import torch


class ContiguousLayerCache:
    """Fixed per-layer buffers (B, max_seq_len, ...) written at contiguous slots."""

    paged = False  # the batch shares positions: slots = positions

    def __init__(self, *buffers: torch.Tensor) -> None:
        self.buffers = buffers
        self.length = 0  # slots 0 .. length - 1 hold entries

    @property
    def batch_size(self) -> int:
        return self.buffers[0].shape[0]

    @property
    def max_seq_len(self) -> int:
        return self.buffers[0].shape[1]

    def update(self, start: int, *new: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Write ``new`` (each (B, T, ...)) at slots start .. start + T - 1; return views of
        every buffer over slots 0 .. length - 1, each (B, length, ...)."""
        seq_len = new[0].shape[1]
        end = start + seq_len
        if end > self.max_seq_len:
            raise ValueError(f"cache holds {self.max_seq_len} positions, a write needs slots {start}..{end - 1}")
        for buf, x in zip(self.buffers, new):
            if x.shape[0] != buf.shape[0]:
                raise ValueError(f"cache batch size is {buf.shape[0]}, got a batch of {x.shape[0]}")
            buf[:, start:end] = x
        self.length = max(self.length, end)
        return tuple(buf[:, : self.length] for buf in self.buffers)


class KVLayerCache(ContiguousLayerCache):
    """Keys (after RoPE) and values of one MHA/GQA/MQA layer."""

    def __init__(
        self, batch_size: int, max_seq_len: int, n_kv_heads: int, head_dim: int, device: Any, dtype: torch.dtype
    ) -> None:
        shape = (batch_size, max_seq_len, n_kv_heads, head_dim)
        super().__init__(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))

    @property
    def k(self) -> torch.Tensor:  # (B, max_len, n_kv, hd)
        return self.buffers[0]

    @property
    def v(self) -> torch.Tensor:  # (B, max_len, n_kv, hd)
        return self.buffers[1]


class LatentLayerCache(ContiguousLayerCache):
    """MLA latent cache: normalised c_kv and the rotated shared RoPE key."""

    def __init__(
        self, batch_size: int, max_seq_len: int, kv_lora_rank: int, rope_dim: int, device: Any, dtype: torch.dtype
    ) -> None:
        super().__init__(
            torch.zeros(batch_size, max_seq_len, kv_lora_rank, device=device, dtype=dtype),
            torch.zeros(batch_size, max_seq_len, rope_dim, device=device, dtype=dtype),
        )

    @property
    def c_kv(self) -> torch.Tensor:  # (B, max_len, kv_lora_rank)
        return self.buffers[0]

    @property
    def k_pe(self) -> torch.Tensor:  # (B, max_len, qk_rope_head_dim)
        return self.buffers[1]


class PagedLayerCache(Protocol):
    """A paged KV / latent layer cache as attention modules use it (see the module docstring)."""

    paged: bool
    key_positions: torch.Tensor  # (B, S) position of each gathered entry, -1 = padding

    def update(self, positions: torch.Tensor, *new: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Store ``new`` (each (B, T, ...)) at ``positions`` (B, T); return every row's
        entries at positions 0 .. S - 1, each (B, S, ...), padded per row."""

    def mask(self, window: Optional[int] = None, force: bool = False) -> tuple[Optional[torch.Tensor], bool]:
        """``(mask (B, 1, T, S) bool, False)``, or `build_mask`'s ``(None, is_causal)`` fast
        answers when they are exact for every row and ``force`` is off."""


class PagedStateCache(Protocol):
    """A recurrent layer's state per sequence, as `LinearAttention` (S (B, H, d, d), z (B, H, d))
    and `Mamba2Mixer` (conv (B, C, K-1), ssm (B, H, P, N)) use it."""

    paged: bool
    token_mask: torch.Tensor  # (B, T) bool, False for the padding after a row's tokens

    def read_state(self) -> tuple[torch.Tensor, ...]:
        """Each row's carried state tensors; zero for rows starting at position 0."""

    def write_state(self, *states: torch.Tensor) -> None:
        """Store each row's state tensors after the chunk."""


class KVCache:
    """The whole model's cache: one layer cache per block, and the tokens consumed so far."""

    paged = False  # a paged cache (the inference engine's) places tokens by explicit positions: no length

    def __init__(self, layers: Sequence[Any]) -> None:
        self.layers = list(layers)
        self.length = 0  # next default position; advanced by `Transformer.forward`

    def __getitem__(self, layer_idx: int) -> Any:
        return self.layers[layer_idx]

    def __len__(self) -> int:
        return len(self.layers)
