"""Block manager: reference counts, free/cached pools, prefix caching and its verification.

A shadow "KV pool" records which token each slot holds when a fake runner computes it; every
check reads a sequence's context back through its block table, so a wrongly shared block, a
write into a shared block or a lost block shows up as a wrong token.
"""
import itertools
from unittest import mock

from hypothesis import given, settings
from hypothesis import strategies as st

from inference.engine import block_manager as bm_module
from inference.engine.block_manager import BlockManager, slot_mapping
from inference.engine.sampling import SamplingParams
from inference.engine.sequence import Sequence

_ids = itertools.count()


def new_seq(tokens) -> Sequence:
    return Sequence(f"r{next(_ids)}", list(tokens), SamplingParams())


class ShadowPool:
    """What the runner would have written into each KV slot: the token at that position."""

    def __init__(self, bm: BlockManager):
        self.bm = bm
        self.slots: dict[int, int] = {}

    def compute(self, seq: Sequence) -> None:
        """Write KV for positions [num_computed_tokens, len(seq)), like a prefill/decode step."""
        bs = self.bm.block_size
        for pos, slot in zip(range(seq.num_computed_tokens, len(seq)),
                             slot_mapping(seq.block_table, bs, seq.num_computed_tokens, len(seq))):
            block = self.bm.blocks[slot // bs]
            assert block.ref_count == 1 and block.hash is None, "write into a shared or cached block"
            self.slots[slot] = seq.token_ids[pos]
        seq.num_computed_tokens = len(seq)
        self.bm.cache_computed_blocks(seq)

    def context(self, seq: Sequence) -> list[int]:
        n = seq.num_computed_tokens
        return [self.slots.get(s) for s in slot_mapping(seq.block_table, self.bm.block_size, 0, n)]


def check_invariants(bm: BlockManager, live: list[Sequence]) -> None:
    refs = [b.ref_count for b in bm.blocks]
    owners = [0] * bm.num_blocks
    for seq in live:
        for b in seq.block_table:
            owners[b] += 1
    assert refs == owners  # every reference belongs to exactly one table entry
    free, evictable = list(bm._free), list(bm._evictable)
    assert len(set(free) | set(evictable)) == len(free) + len(evictable)  # no block twice
    assert {b for b in range(bm.num_blocks) if refs[b] == 0} == set(free) | set(evictable)
    assert bm.num_free_blocks + bm.num_used_blocks == bm.num_blocks
    assert bm.num_free_blocks == sum(r == 0 for r in refs)
    for h, b in bm._cached.items():
        assert bm.blocks[b].hash == h


def test_allocate_append_deallocate_counts():
    bm = BlockManager(num_blocks=8, block_size=4)
    seq = new_seq(range(1, 10))  # 9 tokens -> 3 blocks
    assert bm.can_allocate(seq)
    bm.allocate(seq)
    assert len(seq.block_table) == 3 and bm.num_free_blocks == 5 and seq.num_cached_tokens == 0
    seq.append_token(10)
    seq.append_token(11)
    seq.append_token(12)
    seq.append_token(13)  # 13 tokens -> 4 blocks
    assert bm.can_append(seq)
    bm.may_append(seq)
    assert len(seq.block_table) == 4
    bm.may_append(seq, num_lookahead=4)  # 17 positions -> 5 blocks
    assert len(seq.block_table) == 5 and bm.num_free_blocks == 3
    bm.deallocate(seq)
    assert seq.block_table == [] and bm.num_free_blocks == 8
    check_invariants(bm, [])


def test_slot_mapping():
    assert slot_mapping([5, 2], 4, 2, 7) == [22, 23, 8, 9, 10]


def test_prefix_hit_shares_blocks_and_never_covers_last_token():
    bm = BlockManager(num_blocks=16, block_size=4)
    pool = ShadowPool(bm)
    a = new_seq(range(1, 14))  # 13 tokens: 3 full blocks + 1
    bm.allocate(a)
    pool.compute(a)
    b = new_seq(list(range(1, 13)) + [99, 98])  # same first 3 blocks
    assert bm.num_hit_tokens(b) == 12
    bm.allocate(b)
    assert b.num_cached_tokens == b.num_computed_tokens == 12
    assert b.block_table[:3] == a.block_table[:3] and b.block_table[3] != a.block_table[3]
    assert [bm.ref_count(x) for x in a.block_table] == [2, 2, 2, 1]
    c = new_seq(range(1, 13))  # exactly 3 full cached blocks: the last one is recomputed
    bm.allocate(c)
    assert c.num_cached_tokens == 8 and c.block_table[:2] == a.block_table[:2]
    pool.compute(b)
    pool.compute(c)
    for s in (a, b, c):
        assert pool.context(s) == s.token_ids
    check_invariants(bm, [a, b, c])
    assert c.block_table[2] == a.block_table[2]  # after computing, c's copy was deduplicated


def test_same_step_duplicates_are_deduplicated():
    bm = BlockManager(num_blocks=10, block_size=2)
    pool = ShadowPool(bm)
    a, b = new_seq([1, 2, 3, 4, 5]), new_seq([1, 2, 3, 4, 6])
    bm.allocate(a)
    bm.allocate(b)  # nothing cached yet: both get private blocks
    assert set(a.block_table).isdisjoint(b.block_table) and bm.num_free_blocks == 4
    pool.compute(a)
    pool.compute(b)
    assert b.block_table[:2] == a.block_table[:2] and bm.num_free_blocks == 6
    assert pool.context(b) == b.token_ids
    check_invariants(bm, [a, b])


def test_freed_cached_blocks_stay_findable_until_needed():
    bm = BlockManager(num_blocks=4, block_size=2)
    pool = ShadowPool(bm)
    a = new_seq([1, 2, 3, 4, 5])
    bm.allocate(a)
    pool.compute(a)
    kept = a.block_table[:2]
    bm.deallocate(a)
    assert bm.num_free_blocks == 4 and len(bm._evictable) == 2  # cached but free
    other = new_seq([7, 8, 9])  # 2 blocks: the 2 plain free blocks are used first
    bm.allocate(other)
    assert set(other.block_table).isdisjoint(kept)
    again = new_seq([1, 2, 3, 4, 6])
    assert bm.num_hit_tokens(again) == 4
    assert not bm.can_allocate(again)  # the 2 revived hits use up the free pool; 1 more block needed
    assert bm.can_allocate(new_seq([1, 2, 3]))  # 1 hit revived + 1 evicted
    bm.deallocate(other)
    assert bm.can_allocate(again)
    bm.allocate(again)
    assert again.block_table[:2] == kept and again.num_cached_tokens == 4
    pool.compute(again)
    assert pool.context(again) == again.token_ids
    check_invariants(bm, [again])


def test_eviction_is_lru_and_tail_first():
    bm = BlockManager(num_blocks=4, block_size=1)
    pool = ShadowPool(bm)
    a = new_seq([1, 2, 3])  # 3 one-token blocks, all cached once computed
    bm.allocate(a)
    pool.compute(a)
    head, middle, tail = a.block_table
    bm.deallocate(a)
    assert list(bm._evictable) == [tail, middle, head]  # least recently used first
    b = new_seq([5, 6, 7])  # 3 blocks: the plain free one, then evicts tail and middle
    bm.allocate(b)
    assert {tail, middle} < set(b.block_table) and head not in b.block_table
    assert bm.num_hit_tokens(new_seq([1, 2, 3])) == 1
    check_invariants(bm, [b])


def test_forced_hash_collision_never_shares_a_wrong_block():
    with mock.patch.object(bm_module, "compute_block_hash", lambda prev, tokens: 42):
        bm = BlockManager(num_blocks=12, block_size=2)
        pool = ShadowPool(bm)
        a = new_seq([1, 2, 3, 4, 5])
        bm.allocate(a)
        pool.compute(a)
        b = new_seq([9, 9, 3, 4, 5])  # first block differs, second block equal: no hit at all
        assert bm.num_hit_tokens(b) == 0
        c = new_seq([1, 2, 3, 4, 7])  # first block equal; second equal tokens but hash slot taken by block 0
        assert bm.num_hit_tokens(c) == 2
        d = new_seq([3, 4, 1, 2, 0])  # a's second block's tokens first: same hash, different parent
        bm.allocate(b)
        bm.allocate(c)
        bm.allocate(d)
        assert d.num_cached_tokens == 0
        for s in (b, c, d):
            pool.compute(s)
        for s in (a, b, c, d):
            assert pool.context(s) == s.token_ids
        check_invariants(bm, [a, b, c, d])


def test_stale_child_of_evicted_parent_is_not_reused():
    bm = BlockManager(num_blocks=5, block_size=1)
    pool = ShadowPool(bm)
    a = new_seq([1, 2, 3])
    bm.allocate(a)
    pool.compute(a)
    parent, child, last = a.block_table
    bm.deallocate(a)
    bm._evictable.move_to_end(last)  # make the parent the least recently used block
    bm._evictable.move_to_end(child)
    x = new_seq([7, 8, 9])  # 2 plain free blocks, then the parent is evicted
    bm.allocate(x)
    assert parent in x.block_table and bm._cached.get(bm.blocks[child].hash) == child
    bm.deallocate(x)
    c = new_seq([1, 9])  # recomputes token 1 in a new block, with a new uid
    bm.allocate(c)
    pool.compute(c)
    d = new_seq([1, 2, 5])
    assert bm.num_hit_tokens(d) == 1  # [1] hits c's block; the stale child (old parent) must not
    bm.allocate(d)
    pool.compute(d)
    assert pool.context(d) == d.token_ids
    h = bm.blocks[d.block_table[1]].hash
    assert bm._cached[h] == d.block_table[1] and child in bm._free  # stale entry replaced
    check_invariants(bm, [c, d])


def test_prefix_caching_off():
    bm = BlockManager(num_blocks=6, block_size=2, enable_prefix_caching=False)
    pool = ShadowPool(bm)
    a = new_seq([1, 2, 3, 4, 5])
    bm.allocate(a)
    pool.compute(a)
    b = new_seq([1, 2, 3, 4, 5])
    assert bm.num_hit_tokens(b) == 0
    bm.deallocate(a)
    assert len(bm._evictable) == 0 and bm.num_free_blocks == 6


# ---- property test ------------------------------------------------------------------------
FAMILIES = [[1, 2, 3, 4, 5, 6, 7, 8], [1, 2, 3, 9, 9, 9], [4, 4, 4, 4]]

ops = st.lists(
    st.tuples(st.sampled_from(["new", "new", "compute", "compute", "grow", "free"]), st.integers(0, 50),
              st.integers(0, 2), st.integers(0, 6)),
    min_size=5, max_size=60,
)


@settings(max_examples=150, deadline=None)
@given(ops=ops, num_blocks=st.integers(2, 12), block_size=st.sampled_from([1, 2, 3]),
       caching=st.booleans(), collide=st.booleans())
def test_random_operations_never_leak_or_share_wrongly(ops, num_blocks, block_size, caching, collide):
    hash_fn = (lambda prev, tokens: hash(tokens) % 3) if collide else bm_module.compute_block_hash
    with mock.patch.object(bm_module, "compute_block_hash", hash_fn):
        bm = BlockManager(num_blocks, block_size, enable_prefix_caching=caching)
        pool = ShadowPool(bm)
        live: list[Sequence] = []
        for op, pick, family, extra in ops:
            if op == "new":
                seq = new_seq(FAMILIES[family][: 1 + extra] + [pick % 5])
                if bm.can_allocate(seq):
                    free_before = bm.num_free_blocks
                    bm.allocate(seq)
                    assert bm.num_free_blocks <= free_before
                    live.append(seq)
            elif live:
                seq = live[pick % len(live)]
                if op == "compute":
                    pool.compute(seq)
                elif op == "grow" and seq.num_computed_tokens == len(seq):
                    seq.append_token(pick % 5)
                    if bm.can_append(seq, extra % 3):
                        bm.may_append(seq, extra % 3)
                    else:
                        bm.deallocate(seq)  # what preemption does
                        live.remove(seq)
                elif op == "free":
                    bm.deallocate(seq)
                    live.remove(seq)
            for s in live:
                assert pool.context(s) == s.token_ids[: s.num_computed_tokens]
            check_invariants(bm, live)
        for seq in live:
            bm.deallocate(seq)
        check_invariants(bm, [])
        assert bm.num_free_blocks == num_blocks
