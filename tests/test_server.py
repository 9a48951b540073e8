"""The OpenAI-compatible server (inference/server.py, inference/serving/).

The real `LLMEngine` on a tiny random checkpoint runs behind a live uvicorn on 127.0.0.1; the
tests talk to it with the official `openai` client (the reference nobody here wrote) and raw
HTTP for the wire details (SSE framing, error bodies). The last tests start
`inference/server.py` itself. `AsyncEngine` alone is tested in test_async_engine.py.
"""
from __future__ import annotations

import asyncio
import json
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from conftest import assert_user_error, run_script
from serving_fixtures import free_port, make_checkpoint, serve_checkpoint


# ============================================================================ live server, real engine
MODEL = "tiny-test"
HELLO = [{"role": "user", "content": "Hello there"}]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("srv") / "ckpt")


@pytest.fixture(scope="module")
def served(ckpt):
    with serve_checkpoint(ckpt, model_name=MODEL) as (engine, server):
        yield engine, server


@pytest.fixture
def client(served) -> openai.OpenAI:
    return openai.OpenAI(base_url=served[1].url + "/v1", api_key="unused", max_retries=0)


def health(server) -> dict:
    return httpx.get(server.url + "/health").json()


def wait_until_idle(server, free_blocks: int, timeout: float = 10.0) -> dict:
    """The engine thread applies aborts between steps: poll until every block is back."""
    deadline = time.monotonic() + timeout
    while True:
        h = health(server)
        if (h["running"] == 0 and h["free_blocks"] == free_blocks) or time.monotonic() > deadline:
            return h
        time.sleep(0.02)


def error_of(response: httpx.Response, status: int) -> dict:
    """The body must be OpenAI's error shape with exactly its four fields."""
    assert response.status_code == status, response.text
    body = response.json()
    assert list(body) == ["error"] and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


def test_models_and_health(served, client):
    engine, server = served
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    h = health(server)
    assert h["status"] == "ok" and h["model"] == MODEL
    assert h["free_blocks"] == h["total_blocks"] == engine.num_total_blocks > 0


def test_chat_completion(served, client):
    engine, _ = served
    r = client.chat.completions.create(model=MODEL, messages=HELLO, temperature=0, max_tokens=8)
    choice = r.choices[0]
    assert r.object == "chat.completion" and r.model == MODEL and len(r.choices) == 1
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens == len(engine.encode_chat(HELLO))
    assert 1 <= r.usage.completion_tokens <= 8
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    again = client.chat.completions.create(model=MODEL, messages=HELLO, temperature=0, max_tokens=8)
    assert again.choices[0].message.content == choice.message.content  # greedy is deterministic


def test_chat_streaming_matches_non_streaming(served, client):
    _, server = served
    full = client.chat.completions.create(model=MODEL, messages=HELLO, temperature=0, max_tokens=12)
    chunks = list(client.chat.completions.create(model=MODEL, messages=HELLO, temperature=0, max_tokens=12,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == [full.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == full.usage.model_dump()
    assert all(c.usage is None for c in chunks[:-1])
    # the wire format: SSE `data:` events ending with `data: [DONE]`
    body = {"model": MODEL, "messages": HELLO, "temperature": 0, "max_tokens": 3, "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [ln for ln in r.iter_lines() if ln]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    assert json.loads(events[0][6:])["object"] == "chat.completion.chunk"


def test_completions(served, client):
    engine, _ = served
    text = "Once upon a time"
    ids = engine.tokenizer.encode(text, add_special_tokens=False).ids
    a = client.completions.create(model=MODEL, prompt=text, temperature=0, max_tokens=6)
    b = client.completions.create(model=MODEL, prompt=ids, temperature=0, max_tokens=6)
    assert a.object == "text_completion" and a.choices[0].text == b.choices[0].text
    assert a.usage.prompt_tokens == len(ids) and a.usage.completion_tokens <= 6
    streamed = client.completions.create(model=MODEL, prompt=text, temperature=0, max_tokens=6, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == a.choices[0].text
    many = client.completions.create(model=MODEL, prompt=[text, "The dog"], n=2, temperature=0, max_tokens=4)
    assert [c.index for c in many.choices] == [0, 1, 2, 3]
    assert many.choices[0].text == many.choices[1].text == client.completions.create(
        model=MODEL, prompt=text, temperature=0, max_tokens=4).choices[0].text
    assert many.usage.prompt_tokens == len(ids) + len(engine.tokenizer.encode("The dog").ids)


def test_stop_sequences(served, client):
    kw = dict(model=MODEL, prompt="The cat", temperature=0, max_tokens=24, extra_body={"ignore_eos": True})
    full = client.completions.create(**kw).choices[0].text
    # a random model writes mostly stray bytes: stop at its first 3 ASCII letters after the start
    found = re.search(r"[A-Za-z0-9_]{3}", full[1:])
    assert found, full
    stop = found.group()
    expected = full[: full.index(stop)]
    cut = client.completions.create(**kw, stop=[stop, "never-appears"]).choices[0]
    assert cut.text == expected and cut.finish_reason == "stop"
    streamed = client.completions.create(**kw, stop=stop, stream=True)
    parts = [(c.choices[0].text, c.choices[0].finish_reason) for c in streamed]
    assert "".join(t for t, _ in parts) == expected and parts[-1][1] == "stop"


def test_n_choices_seed_and_usage(served, client):
    kw = dict(model=MODEL, messages=HELLO, n=3, temperature=1.0, seed=5, max_tokens=6, logprobs=True)
    r = client.chat.completions.create(**kw)
    assert sorted(c.index for c in r.choices) == [0, 1, 2]
    contents = [c.message.content for c in r.choices]
    assert len(set(contents)) > 1  # each choice samples on its own (seed + index)
    assert r.usage.completion_tokens == sum(len(c.logprobs.content) for c in r.choices)
    assert r.usage.prompt_tokens == len(served[0].encode_chat(HELLO))  # the prompt counts once
    assert [c.message.content for c in client.chat.completions.create(**kw).choices] == contents
    streamed: dict[int, str] = {}
    for chunk in client.chat.completions.create(**kw, stream=True):
        for c in chunk.choices:
            streamed[c.index] = streamed.get(c.index, "") + (c.delta.content or "")
    assert [streamed[i] for i in range(3)] == contents


def test_logprobs(served, client):
    r = client.chat.completions.create(model=MODEL, messages=HELLO, temperature=0, max_tokens=5, logprobs=True,
                                       top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for tok in content:
        alts = [t.logprob for t in tok.top_logprobs]
        assert len(alts) == 3 and alts == sorted(alts, reverse=True) and alts[0] <= 0
        assert tok.logprob == pytest.approx(alts[0])  # greedy takes the most likely token
    c = client.completions.create(model=MODEL, prompt="The cat", temperature=0, max_tokens=5, logprobs=2,
                                  extra_body={"ignore_eos": True}).choices[0]
    assert len(c.logprobs.tokens) == 5 and len(c.logprobs.top_logprobs[0]) == 2
    if r.choices[0].finish_reason == "length":  # every token is in the text: its bytes spell it
        joined = bytes(b for t in content for b in t.bytes).decode("utf-8", errors="replace")
        assert joined == r.choices[0].message.content


def test_concurrent_streams_complete_and_free_their_blocks(served):
    engine, server = served
    start = health(server)["free_blocks"]
    aclient = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)

    async def one(i: int) -> tuple[str, str]:
        stream = await aclient.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": f"Story number {i}"}], max_tokens=16,
            temperature=1.0, seed=i, stream=True)
        text, finish = "", None
        async for chunk in stream:
            text += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
        return text, finish

    async def main():
        peak = 0

        async def watch():
            nonlocal peak
            async with httpx.AsyncClient() as h:
                while True:
                    peak = max(peak, (await h.get(server.url + "/health")).json()["running"])
                    await asyncio.sleep(0.01)

        watcher = asyncio.ensure_future(watch())
        results = await asyncio.gather(*(one(i) for i in range(32)))
        watcher.cancel()
        return results, peak

    results, peak = asyncio.run(main())
    assert len(results) == 32 and all(finish in ("stop", "length") for _, finish in results)
    assert peak > 1  # the requests were decoded together
    h = wait_until_idle(server, start)
    assert h["running"] == 0 and h["free_blocks"] == start


def test_disconnect_mid_stream_aborts_and_frees_blocks(served):
    _, server = served
    before = health(server)
    body = {"model": MODEL, "prompt": "The cat", "max_tokens": 900, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]
        assert health(server)["running"] == 1 and any(ln.startswith("data: {") for ln in got)
    # leaving the block closed the connection after ~3 of 900 tokens
    h = wait_until_idle(server, before["free_blocks"])
    assert h["running"] == 0 and h["free_blocks"] == before["free_blocks"]
    assert h["aborted"] == before["aborted"] + 1
    # a non-streaming request whose client gives up is aborted too
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", json={**body, "stream": False}, timeout=0.5)
    h = wait_until_idle(server, before["free_blocks"])
    assert h["running"] == 0 and h["aborted"] == before["aborted"] + 2


def test_bad_parameters_are_400(served, client):
    _, server = served
    cases = [
        (dict(temperature=5), "temperature"),
        (dict(n=0), "n"),
        (dict(top_logprobs=2), "top_logprobs"),  # without logprobs=True
        (dict(stream_options={"include_usage": True}), "stream_options"),  # without stream=True
        (dict(extra_body={"not_a_field": 1}), "not_a_field"),
    ]
    for kwargs, param in cases:
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=MODEL, messages=HELLO, **kwargs)
        assert e.value.status_code == 400 and e.value.body["param"] == param, e.value.body
    with pytest.raises(openai.BadRequestError, match="top_p"):  # rejected by SamplingParams itself
        client.chat.completions.create(model=MODEL, messages=HELLO, top_p=0)
    err = error_of(httpx.post(server.url + "/v1/chat/completions", json={"messages": [{"role": "robot",
                                                                                       "content": "x"}]}), 400)
    assert err["param"] == "messages.[0].role" and err["type"] == "invalid_request_error"


def test_malformed_json_is_400(served):
    _, server = served
    for path in ("/v1/chat/completions", "/v1/completions"):
        err = error_of(httpx.post(server.url + path, content=b"{not json",
                                  headers={"content-type": "application/json"}), 400)
        assert "JSON" in err["message"]
    error_of(httpx.post(server.url + "/v1/completions", content=b"[1, 2]",
                        headers={"content-type": "application/json"}), 400)


def test_prompt_over_the_context_is_400(served, client):
    engine, _ = served
    long_prompt = "cat " * (engine.max_model_len + 10)
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt=long_prompt)
    assert e.value.body["code"] == "context_length_exceeded" and e.value.body["param"] == "prompt"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": long_prompt}])
    assert e.value.body["code"] == "context_length_exceeded" and e.value.body["param"] == "messages"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=engine.max_model_len)
    assert e.value.body["param"] == "max_tokens"


def test_unknown_model_or_path_is_404(served, client):
    _, server = served
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-17", messages=HELLO)
    assert e.value.body["code"] == "model_not_found" and e.value.body["param"] == "model"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-17")
    assert "/v1/nothing" in error_of(httpx.get(server.url + "/v1/nothing"), 404)["message"]
    error_of(httpx.post(server.url + "/nothing", json={}), 404)


def test_api_key(served, monkeypatch):
    _, server = served
    ctx = server.server.config.app.state.ctx
    monkeypatch.setattr(ctx, "api_key", "sekret")
    wrong = openai.OpenAI(base_url=server.url + "/v1", api_key="guess", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        wrong.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2)
    assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    assert error_of(httpx.get(server.url + "/v1/models"), 401)["code"] == "invalid_api_key"  # no header
    # a wrong key is reported before a malformed body
    error_of(httpx.post(server.url + "/v1/completions", content=b"{", headers={"authorization": "Bearer x"}), 401)
    right = openai.OpenAI(base_url=server.url + "/v1", api_key="sekret", max_retries=0)
    assert right.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2).choices
    assert httpx.get(server.url + "/health").status_code == 200  # health and the page stay open
    assert httpx.get(server.url + "/").status_code == 200


# ============================================================================ the script
def test_server_script_user_errors(tmp_path, ckpt):
    port = free_port()
    assert_user_error(run_script(["inference/server.py", "--checkpoint", str(tmp_path / "nope"),
                                  "--port", str(port)]), "nope")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", port))
        busy.listen()
        assert_user_error(run_script(["inference/server.py", "--checkpoint", str(ckpt), "--port", str(port)]),
                          str(port))


@pytest.mark.slow
def test_server_script_serves(ckpt):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "inference/server.py", "--checkpoint", str(ckpt), "--port", str(port),
                             "--api_key", "k", "--device", "cpu", "--kv_cache_memory_mb", "4"],
                            cwd=Path(__file__).resolve().parent.parent, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                h = httpx.get(url + "/health").json()
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "server did not come up"
                time.sleep(0.2)
        assert h["model"] == ckpt.name  # the default model name is the checkpoint dir's
        client = openai.OpenAI(base_url=url + "/v1", api_key="k", max_retries=0)
        r = client.chat.completions.create(model=ckpt.name, messages=HELLO, max_tokens=3)
        assert r.usage.completion_tokens >= 1
    finally:
        proc.terminate()
        proc.wait(30)
