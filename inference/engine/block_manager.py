"""Paged KV-cache bookkeeping: fixed-size blocks, reference counts, prefix caching.

PagedAttention (Kwon et al., 2023) stores the KV cache in one pool of fixed-size blocks; each
sequence owns a block table mapping its positions to blocks, so memory is allocated a block at
a time and never fragmented. This module only does the bookkeeping (block ids, no tensors, no
torch); the pool tensors live in the model runner.

Prefix caching (vLLM "automatic prefix caching", SGLang's RadixAttention idea with hashes): a
block that is FULL and whose KV has been COMPUTED gets a chained hash
`compute_block_hash(previous block's hash, this block's tokens)` and is registered in a
hash -> block table. A new sequence whose leading blocks hash the same reuses them (reference
count + 1) instead of recomputing. Hashes are only a lookup key: a hit is accepted only if the
cached block's own tokens equal ours AND its parent is exactly our previous block (each block
allocation gets a fresh `uid`, parents are recorded by uid), so a hash collision can never
share a wrong block. A cached block whose reference count drops to 0 keeps its content and
stays findable until its slot is needed: free blocks without cached content are handed out
first, then cached ones are evicted least-recently-freed first.

The runner never writes into a shared or cached block: only full, computed blocks are shared,
and the last prompt token is never taken from the cache (its logits are needed).
"""
from __future__ import annotations

from collections import OrderedDict, deque

from inference.engine.sequence import Sequence


def compute_block_hash(prev_hash: int | None, token_ids: tuple[int, ...]) -> int:
    """Chained hash of one full block: depends on the whole prefix through `prev_hash`.

    Python's built-in tuple hash: fast and stable within the process (the cache lives in
    memory only). Collisions are possible and harmless: every hit is verified (see module doc).
    """
    return hash((prev_hash, token_ids))


def slot_mapping(block_table: list[int], block_size: int, start: int, end: int) -> list[int]:
    """Flat KV-pool slot of each position in [start, end): block * block_size + offset."""
    return [block_table[p // block_size] * block_size + p % block_size for p in range(start, end)]


class Block:
    """One physical KV block. `hash`/`token_ids`/`parent_uid` are set once it is full and computed."""

    __slots__ = ("block_id", "ref_count", "uid", "hash", "token_ids", "parent_uid")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_count = 0
        self.uid = -1  # fresh number at each allocation: identifies this block's content
        self.hash: int | None = None
        self.token_ids: tuple[int, ...] = ()
        self.parent_uid = -1  # uid of the block before it in the sequence (-1: first block)

    def clear(self) -> None:
        self.hash, self.token_ids, self.parent_uid = None, (), -1


class BlockManager:
    """Owns the ids 0..num_blocks-1 of the KV pool and decides which sequence uses which."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks} and {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self._free: deque[int] = deque(range(num_blocks))  # ref 0, nothing cached: used first
        self._evictable: OrderedDict[int, None] = OrderedDict()  # ref 0, still cached: LRU first
        self._cached: dict[int, int] = {}  # block hash -> block id
        self._next_uid = 0

    # ---- accounting -------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        """Blocks with reference count 0 (cached-but-unused blocks count as free)."""
        return len(self._free) + len(self._evictable)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    def ref_count(self, block_id: int) -> int:
        return self.blocks[block_id].ref_count

    def num_blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def reset_prefix_cache(self) -> None:
        """Drop every cached block's content (all blocks must be unused): the next sequences
        compute their prefixes afresh, e.g. after the model's weights changed."""
        if self.num_used_blocks:
            raise RuntimeError(f"reset_prefix_cache() with {self.num_used_blocks} blocks in use")
        for block_id in list(self._evictable):
            self._uncache(block_id)
            self._free.append(block_id)
        self._evictable.clear()
        self._cached.clear()

    # ---- block-level helpers ----------------------------------------------------------
    def _new_block(self) -> int:
        """A block with reference count 1 and no content: a plain free one, else evict the LRU cached one."""
        if self._free:
            block_id = self._free.popleft()
        elif self._evictable:
            block_id, _ = self._evictable.popitem(last=False)
            self._uncache(block_id)
        else:
            raise RuntimeError("no free KV block (the scheduler must check can_allocate/can_append first)")
        block = self.blocks[block_id]
        block.ref_count = 1
        block.uid = self._next_uid
        self._next_uid += 1
        return block_id

    def _take(self, block_id: int) -> None:
        """One more owner of a cached block (it leaves the evictable set if it was unused)."""
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self._evictable[block_id]
        block.ref_count += 1

    def _release(self, block_id: int) -> None:
        block = self.blocks[block_id]
        block.ref_count -= 1
        if block.ref_count > 0:
            return
        if block.hash is not None and self._cached.get(block.hash) == block_id:
            self._evictable[block_id] = None  # keep the content findable until the slot is needed
        else:
            block.clear()
            self._free.append(block_id)

    def _uncache(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.hash is not None and self._cached.get(block.hash) == block_id:
            del self._cached[block.hash]
        block.clear()

    # ---- prefix cache -----------------------------------------------------------------
    def _block_tokens(self, seq: Sequence, k: int) -> tuple[int, ...]:
        return tuple(seq.token_ids[k * self.block_size : (k + 1) * self.block_size])

    def _match_prefix(self, seq: Sequence) -> list[int]:
        """Cached blocks equal to seq's leading full blocks, never covering its last token."""
        if not self.enable_prefix_caching:
            return []
        hits: list[int] = []
        prev_hash, parent_uid = None, -1
        for k in range((len(seq) - 1) // self.block_size):
            tokens = self._block_tokens(seq, k)
            h = compute_block_hash(prev_hash, tokens)
            block_id = self._cached.get(h)
            if block_id is None:
                break
            block = self.blocks[block_id]
            if block.token_ids != tokens or block.parent_uid != parent_uid:
                break  # hash collision or a stale child of an evicted parent: not our content
            hits.append(block_id)
            prev_hash, parent_uid = h, block.uid
        return hits

    def cache_computed_blocks(self, seq: Sequence) -> None:
        """Register seq's full blocks whose KV is computed (positions < num_computed_tokens).

        If an identical block (same tokens, same parent) is already cached, seq switches to it
        and its own copy is freed, so sequences prefilled in the same step end up sharing.
        """
        if not self.enable_prefix_caching:
            return
        table = seq.block_table
        num_full = min(seq.num_computed_tokens // self.block_size, len(table))
        first = num_full
        while first > 0 and self.blocks[table[first - 1]].hash is None:
            first -= 1
        for k in range(first, num_full):
            parent = self.blocks[table[k - 1]] if k > 0 else None
            prev_hash = parent.hash if parent is not None else None
            parent_uid = parent.uid if parent is not None else -1
            tokens = self._block_tokens(seq, k)
            h = compute_block_hash(prev_hash, tokens)
            block = self.blocks[table[k]]
            other_id = self._cached.get(h)
            if other_id is not None:
                other = self.blocks[other_id]
                if other.token_ids == tokens and other.parent_uid == parent_uid:
                    self._take(other_id)  # same content: share the cached block, free our copy
                    table[k] = other_id
                    self._release(block.block_id)
                    continue
                if other.ref_count == 0:
                    self._evictable.pop(other_id)  # unused, different content (stale/collision): drop it
                    self._uncache(other_id)
                    self._free.append(other_id)
            block.hash, block.token_ids, block.parent_uid = h, tokens, parent_uid
            if h not in self._cached:  # else: a true collision with a block in use; ours stays private
                self._cached[h] = block.block_id

    # ---- sequence-level API -----------------------------------------------------------
    def num_hit_tokens(self, seq: Sequence) -> int:
        """How many leading tokens of seq a fresh allocation would take from the prefix cache."""
        return len(self._match_prefix(seq)) * self.block_size

    def can_allocate(self, seq: Sequence) -> bool:
        """Enough free blocks to hold all of seq's tokens (prefix-cache hits on used blocks are free)."""
        hits = self._match_prefix(seq)
        revived = sum(1 for b in hits if self.blocks[b].ref_count == 0)  # these leave the free pool
        needed = self.num_blocks_for(len(seq)) - len(hits)
        return self.num_free_blocks - revived >= needed

    def allocate(self, seq: Sequence) -> None:
        """Give seq a block table for all its tokens; sets num_cached_tokens = num_computed_tokens = hit tokens."""
        assert not seq.block_table, f"{seq.request_id} already has blocks"
        hits = self._match_prefix(seq)
        for block_id in hits:  # take the hits first so that allocating the rest cannot evict them
            self._take(block_id)
        seq.block_table = hits + [self._new_block() for _ in range(self.num_blocks_for(len(seq)) - len(hits))]
        seq.num_cached_tokens = seq.num_computed_tokens = len(hits) * self.block_size

    def can_append(self, seq: Sequence, num_lookahead: int = 0) -> bool:
        """Enough free blocks to cover positions [0, len(seq) + num_lookahead)."""
        needed = self.num_blocks_for(len(seq) + num_lookahead) - len(seq.block_table)
        return self.num_free_blocks >= needed

    def may_append(self, seq: Sequence, num_lookahead: int = 0) -> None:
        """Grow seq's block table to cover positions [0, len(seq) + num_lookahead)."""
        while len(seq.block_table) < self.num_blocks_for(len(seq) + num_lookahead):
            seq.block_table.append(self._new_block())

    def deallocate(self, seq: Sequence) -> None:
        """Drop seq's ownership of all its blocks (tail first, so tails are evicted before heads)."""
        for block_id in reversed(seq.block_table):
            self._release(block_id)
        seq.block_table = []
        seq.num_computed_tokens = 0
