"""Scheduler: continuous batching, budgets, preemption, finishing rules, no leaks.

A fake runner writes each computed token into a shadow KV pool through the block table and
makes the next token a deterministic function of the context it READS BACK from that pool. So
a wrongly shared block, a lost block or a bad recompute after preemption changes the token
stream, which is compared with a plain reference loop that knows nothing about blocks.
"""
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from inference.engine.block_manager import slot_mapping
from inference.engine.sampling import SamplingParams
from inference.engine.scheduler import Scheduler
from inference.engine.sequence import Sequence, SequenceStatus

VOCAB, EOS = 11, 0


def next_token(context: list[int]) -> int:
    """The fake model: a hash of the whole history."""
    h = 17
    for t in context:
        h = (h * 31 + t + 3) % 1_000_003
    return h % VOCAB


def reference_output(prompt: list[int], params: SamplingParams, max_len: int) -> tuple[list[int], str]:
    tokens = list(prompt)
    while True:
        t = next_token(tokens)
        tokens.append(t)
        if (t == EOS and not params.ignore_eos) or t in params.stop_token_ids:
            return tokens[len(prompt):], "stop"
        if len(tokens) >= max_len:
            return tokens[len(prompt):], "length"


class FakeRunner:
    def __init__(self, sched: Scheduler):
        self.sched = sched
        self.slots: dict[int, int] = {}
        self.num_preempted = 0

    def run(self, out) -> list[int]:
        bm, bs = self.sched.block_manager, self.sched.block_manager.block_size
        ids = []
        for seq in out.seqs:
            start, end = seq.num_computed_tokens, len(seq)
            assert seq.status is SequenceStatus.RUNNING and end > start
            if not out.is_prefill:
                assert end - start == 1
                assert len(seq.block_table) * bs >= end + self.sched.num_lookahead_slots
            for pos, slot in zip(range(start, end), slot_mapping(seq.block_table, bs, start, end)):
                block = bm.blocks[slot // bs]
                assert block.ref_count == 1 and block.hash is None, "write into a shared/cached block"
                self.slots[slot] = seq.token_ids[pos]
            context = [self.slots.get(s) for s in slot_mapping(seq.block_table, bs, 0, end)]
            assert context == seq.token_ids
            ids.append(next_token(context))
        self.num_preempted += len(out.preempted)
        return ids


def check_state(sched: Scheduler) -> None:
    bm = sched.block_manager
    refs = [0] * bm.num_blocks
    for seq in sched.running:
        assert seq.status is SequenceStatus.RUNNING
        for b in seq.block_table:
            refs[b] += 1
    assert refs == [b.ref_count for b in bm.blocks]
    assert bm.num_free_blocks + bm.num_used_blocks == bm.num_blocks
    assert bm.num_free_blocks == sum(r == 0 for r in refs)
    for seq in sched.waiting:
        assert seq.status is SequenceStatus.WAITING and seq.block_table == [] and seq.slot is None
    slots = [seq.slot for seq in sched.running]
    assert len(set(slots)) == len(slots) and all(0 <= s < sched.max_num_seqs for s in slots)
    assert len(sched.running) <= sched.max_num_seqs


def step(sched: Scheduler, runner: FakeRunner) -> list[Sequence]:
    busy = sched.has_unfinished()
    out = sched.schedule()
    assert bool(out.seqs) == busy  # never an empty step while work is left
    if out.is_prefill:
        assert out.num_batched_tokens == sum(len(s) - s.num_computed_tokens for s in out.seqs)
        assert out.num_batched_tokens <= sched.max_num_batched_tokens or len(out.seqs) == 1
    else:
        assert out.num_batched_tokens == len(out.seqs)
    check_state(sched)
    finished = sched.postprocess(out.seqs, runner.run(out)) if out.seqs else []
    check_state(sched)
    return finished


def drain(sched: Scheduler, runner: FakeRunner, max_steps: int = 5000) -> list[Sequence]:
    finished = []
    for _ in range(max_steps):
        if not sched.has_unfinished():
            return finished
        finished += step(sched, runner)
    raise AssertionError("scheduler did not finish (livelock)")


def make(num_blocks=64, block_size=4, max_model_len=64, **kw) -> tuple[Scheduler, FakeRunner]:
    sched = Scheduler(num_blocks, block_size, max_model_len, eos_token_id=EOS, **kw)
    return sched, FakeRunner(sched)


def add(sched: Scheduler, rid: str, prompt, **params) -> Sequence:
    seq = Sequence(rid, list(prompt), SamplingParams(**params))
    sched.add(seq)
    return seq


# ---- deterministic behaviour ----------------------------------------------------------------
def test_generates_reference_streams_with_continuous_batching():
    sched, runner = make(max_num_seqs=3, max_num_batched_tokens=12)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9], [1, 2, 3, 4, 5], [7] * 9, [2, 2]]
    seqs = [add(sched, f"r{i}", p, max_tokens=10, ignore_eos=True) for i, p in enumerate(prompts[:2])]
    step(sched, runner)  # prefill of both
    step(sched, runner)  # decode
    seqs += [add(sched, f"r{i}", p, max_tokens=10, ignore_eos=True) for i, p in enumerate(prompts[2:], 2)]
    out = sched.schedule()  # the newcomers join between decode steps: only one fits max_num_seqs
    assert out.is_prefill and [s.request_id for s in out.seqs] == ["r2"]
    sched.postprocess(out.seqs, runner.run(out))
    drain(sched, runner)
    for seq, prompt in zip(seqs, prompts):
        assert (seq.output_token_ids, seq.finish_reason) == reference_output(prompt, seq.params, len(prompt) + 10)
    assert sched.block_manager.num_free_blocks == 64


def test_prefill_budget_and_long_prompt_admitted_alone():
    sched, runner = make(max_num_seqs=4, max_num_batched_tokens=8)
    add(sched, "a", [1, 2, 3], max_tokens=2)
    add(sched, "b", [4, 5, 6, 7], max_tokens=2)
    add(sched, "long", list(range(1, 21)), max_tokens=2)  # 20 tokens > budget 8
    add(sched, "c", [1], max_tokens=2)
    out = sched.schedule()
    assert [s.request_id for s in out.seqs] == ["a", "b"] and out.num_batched_tokens == 7
    sched.postprocess(out.seqs, runner.run(out))
    out = sched.schedule()
    assert [s.request_id for s in out.seqs] == ["long"] and out.num_batched_tokens == 20
    sched.postprocess(out.seqs, runner.run(out))
    out = sched.schedule()
    assert [s.request_id for s in out.seqs] == ["c"]  # FIFO: never skipped, never starved


def test_prefix_cache_hit_counts_only_new_tokens():
    sched, runner = make(block_size=2, max_num_batched_tokens=32)
    a = add(sched, "a", [1, 2, 3, 4, 5, 6, 7], max_tokens=3, ignore_eos=True)
    drain(sched, runner)
    b = add(sched, "b", [1, 2, 3, 4, 5, 6, 9], max_tokens=3, ignore_eos=True)
    out = sched.schedule()
    assert b.num_cached_tokens == 6 and out.num_batched_tokens == 1
    sched.postprocess(out.seqs, runner.run(out))
    drain(sched, runner)
    assert b.output_token_ids == reference_output(b.prompt_token_ids, b.params, 10)[0]
    assert a.output_token_ids == reference_output(a.prompt_token_ids, a.params, 10)[0]


def test_finished_conversation_is_reused_for_next_turn():
    sched, runner = make(block_size=2)
    a = add(sched, "turn1", [5, 6, 7], max_tokens=6, ignore_eos=True)
    drain(sched, runner)
    turn2 = a.token_ids + [8, 9]
    b = add(sched, "turn2", turn2, max_tokens=1)
    sched.schedule()
    assert b.num_cached_tokens == 8  # prompt + answer of turn 1 (the last answer token had no KV)


@pytest.mark.parametrize("caching", [True, False])
def test_preemption_under_tiny_pool_gives_same_streams(caching):
    # 6 blocks of 2 tokens; 4 requests each growing to 10 tokens: they cannot all fit.
    sched, runner = make(num_blocks=6, block_size=2, max_model_len=16, max_num_seqs=4,
                         max_num_batched_tokens=16, enable_prefix_caching=caching)
    prompts = [[1, 2, 3], [1, 2, 4], [3, 3], [5, 4, 3, 2]]
    seqs = [add(sched, f"r{i}", p, max_tokens=12 - len(p) - 2, ignore_eos=True) for i, p in enumerate(prompts)]
    drain(sched, runner)
    assert runner.num_preempted > 0
    for seq, p in zip(seqs, prompts):
        assert seq.finish_reason == "length"
        assert seq.output_token_ids == reference_output(p, seq.params, 10)[0]
    assert sched.block_manager.num_free_blocks == 6


def test_decode_preempts_the_newest_sequence():
    sched, runner = make(num_blocks=4, block_size=2, enable_prefix_caching=False)
    a = add(sched, "a", [1, 2], max_tokens=3, ignore_eos=True)  # 1 block
    b = add(sched, "b", [3, 4, 5, 6, 7], max_tokens=3, ignore_eos=True)  # 3 blocks: pool full
    out = sched.schedule()
    sched.postprocess(out.seqs, runner.run(out))
    out = sched.schedule()  # a (3 tokens) needs a second block
    assert out.seqs == [a] and out.preempted == [b] and list(sched.waiting) == [b]
    assert b.block_table == [] and b.num_completion_tokens == 1  # its token stays; recomputed later
    sched.postprocess(out.seqs, runner.run(out))
    drain(sched, runner)
    assert b.output_token_ids == reference_output(b.prompt_token_ids, b.params, 8)[0]


def test_add_rejects_impossible_requests():
    sched, _ = make(num_blocks=4, block_size=4, max_model_len=32)
    with pytest.raises(ValueError, match="max_model_len"):
        add(sched, "a", [1] * 30, max_tokens=3)
    with pytest.raises(ValueError, match="whole pool"):
        add(sched, "b", [1] * 10, max_tokens=8)  # needs 17 KV slots > 16
    add(sched, "c", [1] * 10, max_tokens=7)  # exactly fits: the last token never needs KV
    with pytest.raises(ValueError, match="already in use"):
        add(sched, "c", [1], max_tokens=1)
    with pytest.raises(ValueError, match="empty"):
        add(sched, "d", [], max_tokens=1)
    with pytest.raises(ValueError, match="at most"):
        add(sched, "e", [1] * 17, max_tokens=None)
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        Scheduler(8, 4, 32, max_num_seqs=8, max_num_batched_tokens=4)


def test_finishing_rules():
    sched, runner = make(max_model_len=12)
    eos = add(sched, "eos", [1], max_tokens=5)
    ign = add(sched, "ign", [1], max_tokens=3, ignore_eos=True)
    stop = add(sched, "stop", [1], max_tokens=5, stop_token_ids=[7], ignore_eos=True)
    mml = add(sched, "mml", [1, 2], max_tokens=None)
    out = sched.schedule()
    finished = sched.postprocess(out.seqs, [EOS, EOS, 7, 3])
    assert [s.request_id for s in finished] == ["eos", "stop"]
    assert eos.finish_reason == stop.finish_reason == "stop" and eos.output_token_ids == [EOS]
    for _ in range(2):
        out = sched.schedule()
        sched.postprocess(out.seqs, [4] * len(out.seqs))
    assert ign.finish_reason == "length" and ign.output_token_ids == [EOS, 4, 4]
    while sched.has_unfinished():
        out = sched.schedule()
        sched.postprocess(out.seqs, [5] * len(out.seqs))
    assert mml.finish_reason == "length" and len(mml) == 12  # max_tokens=None: up to max_model_len
    assert sched.block_manager.num_free_blocks == sched.block_manager.num_blocks


def test_multi_token_postprocess_stops_midway():
    sched, runner = make(num_lookahead_slots=3)
    seq = add(sched, "s", [1, 2], max_tokens=10, stop_token_ids=[9])
    out = sched.schedule()
    sched.postprocess(out.seqs, [[3]])
    out = sched.schedule()
    assert not out.is_prefill and len(seq.block_table) * 4 >= len(seq) + 3
    sched.postprocess(out.seqs, [[4, 5, 6]])  # e.g. 2 accepted drafts + 1 bonus token
    assert seq.num_computed_tokens == len(seq) - 1 == 5
    sched.postprocess(sched.schedule().seqs, [[6, 9, 8]])
    assert seq.output_token_ids == [3, 4, 5, 6, 6, 9] and seq.finish_reason == "stop"


def test_abort_and_external_finish_free_everything():
    sched, runner = make(max_num_seqs=2)
    a = add(sched, "a", [1, 2, 3], max_tokens=5, ignore_eos=True)
    b = add(sched, "b", [1, 2, 3], max_tokens=5, ignore_eos=True)
    c = add(sched, "c", [4], max_tokens=5)
    out = sched.schedule()
    assert {a.slot, b.slot} == {0, 1} and c.slot is None
    ids = runner.run(out)
    assert sched.abort("a") is a  # aborted while the step ran: postprocess skips it
    sched.postprocess(out.seqs, ids)
    assert a.finish_reason == "abort" and a.output_token_ids == [] and a.block_table == []
    assert sched.abort("c") is c and c.finish_reason == "abort"  # a waiting one
    assert sched.abort("c") is None and sched.abort("nope") is None
    sched.finish(b, "stop")  # the engine found a stop string
    assert b.is_finished and b.slot is None and not sched.has_unfinished()
    assert sched.block_manager.num_free_blocks == sched.block_manager.num_blocks
    check_state(sched)


def test_bookkeeping_modules_import_no_torch():
    code = ("import sys, inference.engine.scheduler, inference.engine.block_manager, inference.engine.sequence;"
            "assert 'torch' not in sys.modules, 'torch imported'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


# ---- property test --------------------------------------------------------------------------
PREFIXES = [[1, 2, 3, 4, 5, 6], [1, 2, 3, 7], [8, 8, 8, 8, 8], [9]]

add_op = st.tuples(st.just("add"), st.integers(0, 3), st.integers(0, 6), st.integers(1, 10), st.booleans(), st.booleans())
op_strategy = st.one_of(
    add_op, add_op, add_op,
    st.tuples(st.just("step"), st.integers(1, 4)),
    st.tuples(st.just("abort"), st.integers(0, 40)),
    st.tuples(st.just("abort_mid"), st.integers(0, 40)),
    st.tuples(st.just("finish"), st.integers(0, 40)),
)


@settings(max_examples=150, deadline=None)
@given(ops=st.lists(op_strategy, min_size=4, max_size=40), num_blocks=st.integers(3, 12),
       block_size=st.sampled_from([1, 2, 4]), max_num_seqs=st.integers(1, 4), extra_budget=st.integers(0, 12),
       lookahead=st.integers(0, 2), caching=st.booleans(), max_model_len=st.integers(8, 40))
def test_random_traffic_never_leaks_and_matches_reference(ops, num_blocks, block_size, max_num_seqs, extra_budget,
                                                         lookahead, caching, max_model_len):
    sched, runner = make(num_blocks, block_size, max_model_len, max_num_seqs=max_num_seqs,
                         max_num_batched_tokens=max_num_seqs * (1 + lookahead) + extra_budget,
                         num_lookahead_slots=lookahead, enable_prefix_caching=caching)
    pool_len = num_blocks * block_size + 1 - lookahead
    added: list[Sequence] = []
    for op in ops:
        if op[0] == "add":
            _, family, cut, max_tokens, ignore_eos, stop7 = op
            prompt = PREFIXES[family][: cut + 1] + [cut % VOCAB]
            params = SamplingParams(max_tokens=max_tokens, ignore_eos=ignore_eos, stop_token_ids=[7] if stop7 else [])
            seq = Sequence(f"r{len(added)}", prompt, params)
            final = len(prompt) + max_tokens
            if final > max_model_len or final > pool_len:
                with pytest.raises(ValueError):
                    sched.add(seq)
                continue
            sched.add(seq)
            added.append(seq)
        elif op[0] == "step":
            for _ in range(op[1]):
                step(sched, runner)
        elif added:
            seq = added[op[1] % len(added)]
            if op[0] == "abort":
                sched.abort(seq.request_id)
            elif op[0] == "finish":
                sched.finish(seq, "stop")
            elif sched.has_unfinished():  # abort while the step runs
                out = sched.schedule()
                ids = runner.run(out)
                sched.abort(seq.request_id)
                sched.postprocess(out.seqs, ids)
            check_state(sched)
    drain(sched, runner)
    assert sched.block_manager.num_free_blocks == num_blocks  # cached-but-free counts as free
    for seq in added:
        assert seq.is_finished and seq.block_table == [] and seq.slot is None
        expected, reason = reference_output(seq.prompt_token_ids, seq.params, len(seq.prompt_token_ids) + seq.params.max_tokens)
        n = seq.num_completion_tokens
        assert seq.output_token_ids == expected[:n]  # an abort or external finish cuts it short
        assert seq.finish_reason == reason if n == len(expected) else seq.finish_reason in ("abort", "stop")


@settings(max_examples=80, deadline=None)
@given(requests=st.lists(st.tuples(st.integers(0, 3), st.integers(0, 6), st.integers(1, 10)), min_size=2, max_size=8),
       block_size=st.sampled_from([1, 2, 4]), spare_blocks=st.integers(0, 2), max_num_seqs=st.integers(2, 8),
       lookahead=st.integers(0, 1), caching=st.booleans())
def test_burst_in_a_pool_fitting_one_request_completes_everything(requests, block_size, spare_blocks, max_num_seqs,
                                                                  lookahead, caching):
    """All requests at once into a pool just big enough for the largest one: heavy preemption."""
    prompts = [PREFIXES[family][: cut + 1] + [cut] for family, cut, _ in requests]
    longest = max(len(p) + max_tokens for p, (_, _, max_tokens) in zip(prompts, requests))
    num_blocks = -(-(longest - 1 + lookahead) // block_size) + spare_blocks
    sched, runner = make(num_blocks, block_size, 64, max_num_seqs=max_num_seqs,
                         max_num_batched_tokens=max_num_seqs * (1 + lookahead), num_lookahead_slots=lookahead,
                         enable_prefix_caching=caching)
    seqs = [add(sched, f"r{i}", p, max_tokens=m, ignore_eos=True) for i, (p, (_, _, m)) in enumerate(zip(prompts, requests))]
    drain(sched, runner)
    for seq, prompt in zip(seqs, prompts):
        assert (seq.output_token_ids, seq.finish_reason) == reference_output(prompt, seq.params, len(seq))
        assert len(seq) == len(prompt) + seq.params.max_tokens
    assert sched.block_manager.num_free_blocks == num_blocks
