"""`AsyncEngine` (inference/serving/async_engine.py): one engine thread, per-request queues.

Driven over a `ScriptedEngine` (the `LLMEngine` interface, no model) so every step is exact:
outputs reach the right stream, the thread sleeps while idle, leaving a stream early or
cancelling its task aborts its sequences, add errors and engine failures reach the caller.
"""
from __future__ import annotations

import asyncio
import threading

import pytest
from tokenizers import Tokenizer

from serving_fixtures import ScriptedEngine, make_tokenizer

from inference.engine.sampling import SamplingParams
from inference.serving import AsyncEngine, EngineDeadError


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Tokenizer:
    d = make_tokenizer(tmp_path_factory.mktemp("tok"))
    return Tokenizer.from_file(str(d / "tokenizer.json"))


def _scripted(tokenizer: Tokenizer, **kw) -> ScriptedEngine:
    return ScriptedEngine(tokenizer, tokenizer.encode(" the cat liked to play").ids, **kw)


def _run(engine: ScriptedEngine, body) -> object:
    """Run `body(async_engine)` on a fresh event loop with the engine thread up."""
    ae = AsyncEngine(engine)
    ae.start()
    try:
        return asyncio.run(body(ae))
    finally:
        ae.shutdown()


def test_streams_get_their_own_outputs(tokenizer):
    engine = _scripted(tokenizer)

    async def body(ae):
        async def collect(max_tokens, n):
            stream = await ae.submit([([5, 6, 7], SamplingParams(max_tokens=max_tokens))] * n)
            got = {}
            async with stream:
                async for i, out in stream:
                    got.setdefault(i, []).extend(out.new_token_ids)
            return got

        return await asyncio.gather(collect(3, 1), collect(5, 2), collect(1, 1))

    a, b, c = _run(engine, body)
    assert [len(a[0]), len(b[0]), len(b[1]), len(c[0])] == [3, 5, 5, 1]
    assert engine.aborted == [] and engine.num_free_blocks == engine.num_total_blocks


def test_idle_engine_thread_does_not_step(tokenizer):
    engine = _scripted(tokenizer)

    async def body(ae):
        stream = await ae.submit([([5], SamplingParams(max_tokens=4))])
        async for _ in stream:
            pass
        before = engine.steps
        await asyncio.sleep(0.3)
        return before, engine.steps

    before, after = _run(engine, body)
    assert before == 4 and after == 4  # exactly one step per token, none while idle


def test_leaving_a_stream_early_aborts_it(tokenizer):
    engine = _scripted(tokenizer, delay=0.005)

    async def body(ae):
        stream = await ae.submit([([5, 6], SamplingParams(max_tokens=400))] * 2)
        async with stream:
            async for i, out in stream:
                if len(out.new_token_ids) and engine.steps >= 3:
                    break
        for _ in range(200):  # the abort is posted to the engine thread
            if ae.num_running == 0:
                break
            await asyncio.sleep(0.01)
        return stream.request_ids, ae.num_aborted

    ids, num_aborted = _run(engine, body)
    assert sorted(engine.aborted) == sorted(ids) and num_aborted == 2
    assert engine.num_free_blocks == engine.num_total_blocks and not engine.has_unfinished()


def test_cancelled_task_aborts_its_sequences(tokenizer):
    engine = _scripted(tokenizer, delay=0.005)

    async def body(ae):
        async def consume():
            stream = await ae.submit([([5], SamplingParams(max_tokens=400))])
            async with stream:
                async for _ in stream:
                    pass

        task = asyncio.ensure_future(consume())
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(200):
            if not engine.has_unfinished():
                break
            await asyncio.sleep(0.01)

    _run(engine, body)
    assert len(engine.aborted) == 1 and not engine.has_unfinished()


def test_add_error_is_raised_and_leaves_nothing_behind(tokenizer):
    engine = _scripted(tokenizer, max_model_len=8)

    async def body(ae):
        with pytest.raises(ValueError, match="does not fit"):
            await ae.submit([([1, 2], SamplingParams(max_tokens=2)), (list(range(10)), SamplingParams())])
        return ae.num_running

    assert _run(engine, body) == 0
    assert len(engine.aborted) == 1 and not engine.has_unfinished()  # the first pair was taken back


def test_engine_failure_reaches_the_request_and_serving_goes_on(tokenizer):
    engine = _scripted(tokenizer)
    engine.fail_next_step = RuntimeError("boom")

    async def body(ae):
        stream = await ae.submit([([5], SamplingParams(max_tokens=3))])
        with pytest.raises(RuntimeError, match="boom"):
            async for _ in stream:
                pass
        again = await ae.submit([([5], SamplingParams(max_tokens=2))])
        return [out.finish_reason async for _, out in again]

    assert _run(engine, body) == [None, "length"]


def test_shutdown_fails_waiting_requests(tokenizer):
    engine = _scripted(tokenizer, delay=0.01)

    async def body(ae):
        stream = await ae.submit([([5], SamplingParams(max_tokens=1000))])
        threading.Timer(0.1, ae.shutdown).start()
        with pytest.raises(EngineDeadError):
            async for _ in stream:
                pass
        with pytest.raises(EngineDeadError):
            await ae.submit([([5], SamplingParams())])

    _run(engine, body)
