"""A bounded soak test of the OpenAI-compatible server (loopback only, the real engine).

200 requests, 32 at a time, mixing valid chat and text completions (streaming and not, n > 1,
stop strings, logprobs, template options, extreme but legal sampling values) with what clients
get wrong (malformed or non-UTF-8 JSON, wrong types, unknown fields, out-of-range values,
prompts over the context) and clients that hang up mid-stream. Expected: no 5xx at all, every
valid request answered in full, every bad one a 4xx in OpenAI's error shape, then ``/health``
back to every KV block free and nothing running, and the process RSS stable (printed; run
with ``-s`` to see it). A warm-up round first, so the RSS compared is that of a warm server.
"""
from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import httpx
import pytest

from serving_fixtures import make_checkpoint, serve_checkpoint

pytestmark = pytest.mark.slow

MAX_LEN = 192  # the model's context: over-long prompts are cheap to write
CONCURRENCY = 32
REQUESTS = 200
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me a story about a cat."}]


@dataclass
class Case:
    """One request: what to send and what must come back."""

    kind: str  # "ok", "bad" (a 4xx) or "hangup" (the client leaves mid-stream)
    path: str
    body: Any = None  # a JSON value, or raw bytes
    stream: bool = False
    n: int = 1


def _valid(rng: random.Random, i: int) -> Case:
    stream = rng.random() < 0.5
    n = rng.choice([1, 1, 2, 3])
    common = {"max_tokens": rng.randint(1, 12), "n": n, "stream": stream, "seed": rng.choice([None, i]),
              "temperature": rng.choice([0, 0.7, 1.0, 1e-30]), "top_p": rng.choice([None, 0.9, 1e-9]),
              "stop": rng.choice([None, "the", ["a", "e"], "."])}
    extra = rng.choice([{}, {"top_k": 10**30}, {"repetition_penalty": 1.3, "min_p": 0.1}, {"ignore_eos": True},
                        {"presence_penalty": -2, "frequency_penalty": 2}])
    if stream and rng.random() < 0.5:
        extra = {**extra, "stream_options": {"include_usage": True}}
    if rng.random() < 0.5:
        body = {"messages": MESSAGES, **common, **extra}
        if rng.random() < 0.3:
            body.update(logprobs=True, top_logprobs=rng.randint(0, 5))
        if rng.random() < 0.2:
            body["chat_template_kwargs"] = {"enable_thinking": False}
        return Case("ok", CHAT, body, stream, n)
    prompt = rng.choice(["Once upon a time", ["The cat", "A dog"], [5, 6, 7, 8], [[9, 10], [11]]])
    prompts = 1 if isinstance(prompt, str) or isinstance(prompt[0], int) else len(prompt)
    body = {"prompt": prompt, **common, **extra}
    if rng.random() < 0.3:
        body["logprobs"] = rng.randint(0, 5)
    return Case("ok", COMPLETIONS, body, stream, n * prompts)


BAD = [
    (CHAT, b'{"messages": [{"role": "user", "content": "hi"}'),  # malformed JSON
    (CHAT, b'\xff\xfe{"messages": 1}'),  # not UTF-8
    (CHAT, b"[1, 2, 3]"),  # not an object
    (CHAT, b""),  # no body
    (COMPLETIONS, b"[" * 50_000 + b"]" * 50_000),  # nested beyond any parser's depth
    (CHAT, {"messages": "hi"}),  # wrong types
    (CHAT, {"messages": [{"role": "robot", "content": "hi"}]}),
    (CHAT, {"messages": MESSAGES, "temperature": "hot"}),
    (CHAT, {"messages": MESSAGES, "n": 0}),
    (CHAT, {"messages": MESSAGES, "max_tokens": -1}),
    (CHAT, {"messages": MESSAGES, "seed": 2**70}),
    (CHAT, {"messages": MESSAGES, "stop": [""]}),
    (CHAT, {"messages": MESSAGES, "top_p": 0}),
    (CHAT, {"messages": MESSAGES, "top_logprobs": 3}),  # without logprobs
    (CHAT, {"messages": MESSAGES, "logit_bias": {"1": 5}}),  # unknown field
    (CHAT, {"messages": MESSAGES, "chat_template_kwargs": {"messages": []}}),
    (CHAT, {"messages": MESSAGES, "model": "gpt-4"}),  # 404
    (CHAT, {"messages": [{"role": "user", "content": "cat " * 400}]}),  # over the context
    (CHAT, {"messages": MESSAGES, "max_tokens": 10**9}),
    (COMPLETIONS, {"prompt": "cat " * 400, "max_tokens": 4}),
    (COMPLETIONS, {"prompt": [], "max_tokens": 4}),
    (COMPLETIONS, {"prompt": [[]], "max_tokens": 4}),
    (COMPLETIONS, {"prompt": [10**9], "max_tokens": 4}),
    (COMPLETIONS, {"prompt": [-1], "max_tokens": 4}),
    (COMPLETIONS, {"prompt": "hi", "logprobs": 6}),
    (COMPLETIONS, {"prompt": "hi", "stream": False, "stream_options": {"include_usage": True}}),
    (COMPLETIONS, {"prompt": "hi", "presence_penalty": float("nan")}),
]


def make_cases(seed: int = 0, count: int = REQUESTS) -> list[Case]:
    """A fixed mix: ~60% valid, ~30% bad, ~10% hang-ups, shuffled."""
    rng = random.Random(seed)
    cases = []
    for i in range(count):
        r = rng.random()
        if r < 0.1:
            body = {"messages": MESSAGES, "max_tokens": 64, "stream": True, "ignore_eos": True}
            cases.append(Case("hangup", CHAT, body, True) if rng.random() < 0.5 else
                         Case("hangup", COMPLETIONS, {"prompt": "Hi", "max_tokens": 64, "stream": True,
                                                       "ignore_eos": True, "n": 2}, True))
        elif r < 0.4:
            path, body = BAD[i % len(BAD)]
            cases.append(Case("bad", path, body))
        else:
            cases.append(_valid(rng, i))
    return cases


def _content(body: Any) -> dict[str, Any]:
    if isinstance(body, bytes):
        return {"content": body, "headers": {"content-type": "application/json"}}
    return {"content": json.dumps(body, allow_nan=True), "headers": {"content-type": "application/json"}}


async def send(client: httpx.AsyncClient, case: Case) -> tuple[int, Optional[str]]:
    """(status, problem or None) of one request."""
    if not case.stream:
        r = await client.post(case.path, **_content(case.body))
        if case.kind == "bad":
            ok = 400 <= r.status_code < 500 and "message" in r.json().get("error", {})
            return r.status_code, None if ok else f"bad request answered {r.status_code}: {r.text[:200]}"
        if r.status_code != 200:
            return r.status_code, f"valid request answered {r.status_code}: {r.text[:200]}"
        choices = r.json()["choices"]
        done = len(choices) == case.n and all(c["finish_reason"] in ("stop", "length") for c in choices)
        return r.status_code, None if done else f"incomplete answer {r.text[:200]}"
    async with client.stream("POST", case.path, **_content(case.body)) as r:
        if r.status_code != 200:
            return r.status_code, f"stream answered {r.status_code}"
        finished, lines = set(), []
        async for line in r.aiter_lines():
            if case.kind == "hangup":  # leave after the first event
                return r.status_code, None
            if not line:
                continue
            if line.startswith("data: ") and line != "data: [DONE]":
                event = json.loads(line[6:])
                if "error" in event:
                    return 500, f"error event {event}"
                finished |= {c["index"] for c in event["choices"] if c.get("finish_reason")}
            lines.append(line)
        complete = lines and lines[-1] == "data: [DONE]" and len(finished) == case.n
        return r.status_code, None if complete else f"stream ended early: {lines[-3:]}"


async def run_all(url: str, cases: list[Case]) -> list[tuple[Case, int, Optional[str]]]:
    limit = asyncio.Semaphore(CONCURRENCY)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=httpx.Limits(max_connections=CONCURRENCY)) as c:
        async def one(case: Case) -> tuple[Case, int, Optional[str]]:
            async with limit:
                status, problem = await send(c, case)
                return case, status, problem

        return await asyncio.gather(*(one(case) for case in cases))


def rss_mb() -> Optional[float]:
    """This process's resident memory in MiB (Linux /proc), None elsewhere."""
    status = Path("/proc/self/status")
    if not status.is_file():
        return None
    for line in status.read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return None


def wait_idle(url: str, timeout: float = 20.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        health = httpx.get(url + "/health").json()
        idle = health["running"] == 0 and health["free_blocks"] == health["total_blocks"]
        if idle or time.monotonic() > deadline:
            return health
        time.sleep(0.05)


def test_soak(tmp_path_factory):
    ckpt = make_checkpoint(tmp_path_factory.mktemp("soak") / "ckpt", max_seq_len=MAX_LEN)
    with serve_checkpoint(ckpt) as (engine, server):
        asyncio.run(run_all(server.url, make_cases(seed=1, count=60)))  # warm-up
        wait_idle(server.url)
        before = rss_mb()
        start = time.monotonic()
        results = asyncio.run(run_all(server.url, make_cases()))
        seconds = time.monotonic() - start
        health = wait_idle(server.url)
        after = rss_mb()
    statuses = [status for _, status, _ in results]
    problems = [f"{case.kind} {case.path} {str(case.body)[:80]}: {p}" for case, _, p in results if p]
    kinds = {k: sum(c.kind == k for c, _, _ in results) for k in ("ok", "bad", "hangup")}
    print(f"\nsoak: {len(results)} requests ({kinds}) in {seconds:.1f} s, {CONCURRENCY} concurrent; "
          f"5xx: {sum(s >= 500 for s in statuses)}; statuses: {sorted(set(statuses))}; "
          f"RSS {before and round(before, 1)} -> {after and round(after, 1)} MiB; health after: {health}")
    assert len(results) == REQUESTS and min(kinds.values()) > 0
    assert not any(s >= 500 for s in statuses), problems
    assert not problems, "\n".join(problems)
    assert health["running"] == 0 and health["free_blocks"] == health["total_blocks"], health
    if before is not None:
        assert after - before < 64, f"RSS grew from {before:.0f} to {after:.0f} MiB"
