"""Chunked prefill (`Scheduler(prefill_chunk_size=...)`, `LLMEngine(prefill_chunk_size=...)`): a long
prompt arriving while other sequences decode is computed a chunk at a time, in turns with decode
steps, and every output stays the full forward's greedy text (KV kinds, prefix caching,
preemption, speculative decoding)."""
from __future__ import annotations

import random

import pytest

from engine_fixtures import save_model
from inference.engine.sequence import Sequence
from inference.engine.scheduler import Scheduler
from inference.engine.sampling import SamplingParams
from model import get_preset
from test_paged_engine import VOCAB, checkpoint, engine, reference, tok_dir  # noqa: F401  (fixtures)

CHUNK = 6
LONG = 41
NEW = 12
GREEDY = SamplingParams(temperature=0, max_tokens=NEW, ignore_eos=True)


def _prompts(seed: int = 0) -> tuple[list[list[int]], list[int]]:
    rng = random.Random(seed)
    short = [[rng.randrange(VOCAB) for _ in range(n)] for n in (5, 9, 7)]
    return short, [rng.randrange(VOCAB) for _ in range(LONG)]


def _run_with_late_long_prompt(eng, short, long, params=GREEDY) -> tuple[dict[str, list[int]], list[set[str]]]:
    """Start the short prompts, add the long one after 3 decode steps; (tokens per request, who advanced per step)."""
    ids = [eng.add_request(p, params) for p in short]
    tokens = {rid: [] for rid in ids}
    steps: list[set[str]] = []

    def step() -> None:
        outs = eng.step()
        steps.append({o.request_id for o in outs if o.new_token_ids})
        for o in outs:
            tokens[o.request_id] += o.new_token_ids

    for _ in range(4):  # the prefill, then 3 decode steps
        step()
    tokens[eng.add_request(long, params, request_id="long")] = []
    while eng.has_unfinished():
        step()
    return tokens, steps


@pytest.mark.parametrize("kind", ["gqa", "sliding_window", "linear_attention", "mla"])
def test_long_prompt_is_chunked_without_stalling_decoders(kind, checkpoint) -> None:  # noqa: F811
    short, long = _prompts()
    eng = engine(checkpoint(kind), prefill_chunk_size=CHUNK, max_num_seqs=8)
    tokens, steps = _run_with_late_long_prompt(eng, short, long)
    expected = reference(checkpoint(kind), short + [long], NEW)
    assert [tokens[f"req-{i}"] for i in range(3)] + [tokens["long"]] == expected
    start = 4
    first_long = next(i for i, s in enumerate(steps) if "long" in s)
    assert first_long - start >= LONG // CHUNK  # the prompt took several chunk steps ...
    for i in range(start, first_long):  # ... and the decoders advanced in every other one of them
        assert steps[i] or steps[i + 1], f"no stream advanced in steps {i} and {i + 1}"
        assert "req-0" in steps[i] | steps[i + 1]
    if eng.scheduler.mix_chunks:  # KV-pool models: each chunk rides in a decode step (one packed forward)
        assert kind in ("gqa", "sliding_window")
        assert all("req-0" in steps[i] for i in range(start, first_long))


def test_chunked_prompts_share_prefix_cache_and_survive_preemption(checkpoint) -> None:  # noqa: F811
    short, long = _prompts(1)
    expected = reference(checkpoint("gqa"), short + [long], NEW)
    eng = engine(checkpoint("gqa"), prefill_chunk_size=CHUNK, max_num_seqs=8)
    _run_with_late_long_prompt(eng, short, long)
    rid = eng.add_request(long, GREEDY)
    seq = eng.scheduler.get(rid)
    out = []
    while eng.has_unfinished():
        out += [t for o in eng.step() for t in o.new_token_ids]
    assert seq.num_cached_tokens >= (LONG // 4) * 4 - 4  # the chunks' full blocks were cached
    assert out == expected[-1]

    tiny = engine(checkpoint("gqa"), prefill_chunk_size=CHUNK, kv_cache_memory_mb=20 * 4 * 2 * 2 * 32 * 4 / 2**20)
    tokens, _ = _run_with_late_long_prompt(tiny, short, long)  # a pool of 20 blocks: preemptions
    assert [tokens[f"req-{i}"] for i in range(3)] + [tokens["long"]] == expected


def test_chunked_prefill_with_speculative_decoding(checkpoint, tok_dir, tmp_path) -> None:  # noqa: F811
    draft = save_model(get_preset("tiny", vocab_size=VOCAB, n_layers=1), tmp_path / "draft", tok_dir, seed=1)
    short, long = _prompts(2)
    eng = engine(checkpoint("gqa"), prefill_chunk_size=CHUNK, draft_checkpoint=draft, num_speculative_tokens=3)
    tokens, _ = _run_with_late_long_prompt(eng, short, long)
    assert [tokens[f"req-{i}"] for i in range(3)] + [tokens["long"]] == reference(checkpoint("gqa"), short + [long], NEW)


def test_scheduler_alternates_chunks_with_decode_steps() -> None:
    sched = Scheduler(num_blocks=64, block_size=4, max_model_len=128, max_num_seqs=4, max_num_batched_tokens=64,
                      prefill_chunk_size=5)
    params = SamplingParams(max_tokens=10, ignore_eos=True)
    a = Sequence("a", list(range(3)), params)
    sched.add(a)
    out = sched.schedule()
    assert out.is_prefill and out.num_new_tokens == [3]  # nothing decodes: the whole prompt
    sched.postprocess(out.seqs, [7])
    b = Sequence("b", list(range(12)), params)
    sched.add(b)
    kinds = []
    for _ in range(6):
        out = sched.schedule()
        kinds.append((out.is_prefill, [s.request_id for s in out.seqs], out.num_new_tokens))
        if out.is_prefill:
            for seq, n in zip(out.seqs, out.num_new_tokens):
                sched.advance_prefill(seq, n) if seq.num_computed_tokens + n < len(seq) else sched.postprocess([seq], [1])
        else:
            sched.postprocess(out.seqs, [1] * len(out.seqs))
    assert kinds == [(False, ["a"], [1]), (True, ["b"], [5]), (False, ["a"], [1]), (True, ["b"], [5]),
                     (False, ["a"], [1]), (True, ["b"], [2])]  # turns: a decodes between b's chunks
    assert len(b) == 13 and sched.schedule().seqs == [a, b]  # b decodes with a from now on


def test_scheduler_mixes_chunks_into_decode_steps() -> None:
    sched = Scheduler(num_blocks=64, block_size=4, max_model_len=128, max_num_seqs=4, max_num_batched_tokens=64,
                      prefill_chunk_size=5, mix_chunks=True)
    params = SamplingParams(max_tokens=10, ignore_eos=True)
    a = Sequence("a", list(range(3)), params)
    sched.add(a)
    sched.postprocess(sched.schedule().seqs, [7])
    b = Sequence("b", list(range(12)), params)
    sched.add(b)
    kinds = []
    for _ in range(3):
        out = sched.schedule()
        kinds.append((out.packed, [s.request_id for s in out.seqs], out.num_new_tokens))
        for seq, n in zip(out.seqs, out.num_new_tokens):
            if seq.num_computed_tokens + n < len(seq):
                sched.advance_prefill(seq, n)
            else:
                sched.postprocess([seq], [1])
    assert kinds == [(True, ["a", "b"], [1, 5]), (True, ["a", "b"], [1, 5]), (True, ["a", "b"], [1, 2])]
