"""The web chat page at `/` (inference/web/index.html).

The browser test drives a real headless Chromium (the Debian `chromium` package; skipped
with a reason where it is absent) through the Chrome DevTools Protocol over
`--remote-debugging-pipe`: JSON messages separated by NUL bytes on file descriptors 3
(commands in) and 4 (results out). That needs no websocket library and no debugging port,
and each command is answered (no guessing with sleeps): `Runtime.evaluate` with
`awaitPromise` waits for `chat.send(...)`, which resolves when the streamed reply is complete.
"""
from __future__ import annotations

import json
import os
import re
import select
import shutil
import subprocess
import time
import urllib.parse
from pathlib import Path
from typing import Any, Optional

import httpx
import openai
import pytest
from tokenizers import Tokenizer

from serving_fixtures import LiveServer, ScriptedEngine, make_checkpoint, make_tokenizer, serve_checkpoint

from inference.serving import create_app

CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run", "--remote-debugging-pipe",
]
# what Runtime.evaluate answers when the document it ran in goes away mid-navigation
NAVIGATING = ("Inspected target navigated or closed", "Execution context was destroyed",
              "Cannot find default execution context")


def test_page_is_served_with_no_external_assets(tmp_path):
    tok = Tokenizer.from_file(str(make_tokenizer(tmp_path / "tok") / "tokenizer.json"))
    engine = ScriptedEngine(tok, tok.encode(" hi").ids)
    with LiveServer(create_app(engine, "scripted")) as server:
        r = httpx.get(server.url + "/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    page = r.text
    assert "<script>" in page and "/v1/chat/completions" in page and "getReader()" in page
    # every asset is inline: no src/href attributes, no CSS url()/@import, no absolute URLs
    assert not re.search(r"\b(src|href)\s*=", page, re.I)
    assert not re.search(r"url\(|@import|https?://|//cdn", page, re.I)


class Chromium:
    """Headless Chromium driven by CDP over a pipe (`--remote-debugging-pipe`)."""

    def __init__(self, binary: str, profile: Path) -> None:
        cmd_r, self._cmd_w = os.pipe()
        self._res_r, res_w = os.pipe()
        flags = [*CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank"]
        # bash puts our pipe ends on fds 3 and 4, where Chromium expects them
        self.log = profile.parent / "chromium.log"
        self.proc = subprocess.Popen(["bash", "-c", f'exec "$0" "$@" 3<&{cmd_r} 4>&{res_w}', binary, *flags],
                                     pass_fds=(cmd_r, res_w), stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=open(self.log, "wb"))
        os.close(cmd_r)
        os.close(res_w)
        self._buf = b""
        self._id = 0
        self.session: Optional[str] = None

    def call(self, method: str, timeout: float = 60, **params: Any) -> dict:
        self._id += 1
        msg: dict[str, Any] = {"id": self._id, "method": method, "params": params}
        if self.session is not None and not method.startswith("Target."):
            msg["sessionId"] = self.session
        os.write(self._cmd_w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            while b"\0" in self._buf:
                raw, self._buf = self._buf.split(b"\0", 1)
                reply = json.loads(raw)
                if reply.get("id") == self._id:  # anything else is an event we did not ask for
                    if "error" in reply:
                        raise RuntimeError(f"{method}: {reply['error']}")
                    return reply["result"]
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{method} got no answer in {timeout} s; see {self.log}")
            if select.select([self._res_r], [], [], left)[0]:
                chunk = os.read(self._res_r, 1 << 16)
                if not chunk:
                    raise RuntimeError(f"Chromium closed the pipe; see {self.log}")
                self._buf += chunk

    def open(self, url: str) -> None:
        target = self.call("Target.createTarget", url=url)["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]

    def js(self, expression: str, timeout: float = 60) -> Any:
        """Evaluate in the page, awaiting a returned promise; the JSON value comes back."""
        result = self.call("Runtime.evaluate", timeout=timeout, expression=expression, returnByValue=True,
                           awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"page error: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 30) -> Any:
        """Poll until ``expression`` is truthy. While the page navigates, an evaluation can land
        in the old document as it goes away; that poll is retried, not failed."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                value = self.js(expression)
            except RuntimeError as e:
                if not any(s in str(e) for s in NAVIGATING):
                    raise
                value = None
            if value:
                return value
            time.sleep(0.05)
        raise TimeoutError(f"page never satisfied {expression!r}")

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._cmd_w)
        os.close(self._res_r)


@pytest.fixture
def chromium(tmp_path):
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        pytest.skip("Chromium not installed (Debian: apt-get install -y chromium)")
    browser = Chromium(binary, tmp_path / "profile")
    yield browser
    browser.close()


@pytest.mark.slow
def test_page_streams_a_multi_turn_chat(chromium, tmp_path, monkeypatch):
    ckpt = make_checkpoint(tmp_path / "ckpt")
    with serve_checkpoint(ckpt) as (engine, server):
        seen: list[list[dict]] = []  # every conversation the server was asked to continue
        encode_chat = engine.encode_chat
        monkeypatch.setattr(engine, "encode_chat", lambda messages, template_kwargs=None: seen.append(messages)
                            or encode_chat(messages, template_kwargs))

        chromium.open(server.url + "/")
        chromium.wait_for("window.chat && document.getElementById('model').textContent.includes('tiny-test')")
        chromium.js("document.getElementById('temperature').value = '0';"
                    "document.getElementById('max_tokens').value = '12'; true")
        # count the updates of the reply bubble: a streamed reply is rendered piece by piece
        chromium.js("window.renders = 0; new MutationObserver((records) => { for (const r of records)"
                    " if (r.target.classList && r.target.classList.contains('assistant')) window.renders++; })"
                    ".observe(document.getElementById('log'), {subtree: true, childList: true}); true")
        chromium.js("chat.send('Hello there')")
        first = chromium.js("chat.messages")
        assert [m["role"] for m in first] == ["user", "assistant"] and first[0]["content"] == "Hello there"
        reply = first[1]["content"]
        # what the page assembled from the stream is what a non-streaming request returns
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
        same = client.chat.completions.create(model="tiny-test", messages=first[:1], temperature=0, max_tokens=12)
        assert reply == same.choices[0].message.content and len(reply) > 0
        deltas = [c.choices[0].delta.content for c in client.chat.completions.create(
            model="tiny-test", messages=first[:1], temperature=0, max_tokens=12, stream=True) if c.choices]
        pieces = len([d for d in deltas if d])
        assert pieces >= 2 and chromium.js("window.renders") == pieces  # one render per streamed piece

        chromium.js("chat.send('And then?')")
        assert seen[-1] == [{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": reply},
                           {"role": "user", "content": "And then?"}]
        assert chromium.js("document.body.dataset.replies") == "2"
        assert chromium.js("document.body.dataset.state") == "idle"

        # ?q= sends a first message as soon as the page loads
        chromium.js(f"location.href = {json.dumps(server.url + '/?q=' + urllib.parse.quote('Hi from the URL'))}; true")
        chromium.wait_for("document.body && document.body.dataset.replies === '1'")
        assert chromium.js("chat.messages[0].content") == "Hi from the URL"
