"""Any OpenAI-compatible server as an evaluation backend (``--base_url URL --model NAME``).

Generation only, as lm-evaluation-harness's ``local-completions`` / ``local-chat-completions``:
a text prompt goes to ``POST {base_url}/completions``, chat messages (``--chat``) to
``POST {base_url}/chat/completions``, each request on its own HTTP call from a small thread pool
(``concurrency``) so that the server's continuous batching sees many at once. The stop strings
are sent and applied again on the returned text (servers cap their number, OpenAI's at 4).
Log-likelihood tasks (mmlu, ppl) need prompt log-probabilities, which these endpoints do not
return: asking for them is a user error naming the task.

A server that does not answer, or answers with an error, is a `UserError` naming the URL.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Optional, Sequence

import httpx

from eval.requests import GenerateUntil
from utils.errors import UserError

Progress = Callable[[int], None]


def cut_at_stop(text: str, until: Sequence[str]) -> str:
    """The text before the first occurrence of any stop string."""
    hits = [i for i in (text.find(s) for s in until if s) if i >= 0]
    return text[: min(hits)] if hits else text


class OpenAIClientLM:
    """Completions from an OpenAI-compatible HTTP endpoint."""

    def __init__(self, base_url: str, model: Optional[str] = None, api_key: Optional[str] = None,
                 concurrency: int = 8, timeout: float = 600.0) -> None:
        self.base_url = base_url.rstrip("/")
        for suffix in ("/chat/completions", "/completions"):
            self.base_url = self.base_url.removesuffix(suffix)
        key = api_key or os.environ.get("LLM_API_KEY") or os.environ.get("OPENAI_API_KEY")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.client = httpx.Client(headers=headers, timeout=httpx.Timeout(timeout, connect=10.0))
        self.concurrency = concurrency
        self.model = self._check_server(model)

    @property
    def name(self) -> str:
        return self.model

    def describe(self) -> dict:
        return {"backend": "openai-api", "base_url": self.base_url, "model": self.model}

    def _call(self, method: str, path: str, body: Optional[dict] = None) -> Any:
        url = self.base_url + path
        try:
            response = self.client.request(method, url, json=body)
        except httpx.HTTPError as e:
            raise UserError(f"no OpenAI-compatible server answers at {url} ({type(e).__name__}: {e})") from None
        if response.status_code >= 400:
            try:
                detail = response.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                detail = response.text[:200]
            raise UserError(f"{url} answered HTTP {response.status_code}: {detail}")
        try:
            return response.json()
        except ValueError:
            raise UserError(f"{url} did not answer with JSON (is it an OpenAI-compatible /v1 URL?)") from None

    def _check_server(self, model: Optional[str]) -> str:
        """Fail now if nobody answers at the URL; without a model name, take the first served one."""
        try:
            data = self._call("GET", "/models").get("data") or []
        except UserError:
            if model is None or not self._answers():
                raise
            return model  # a server without /models: the name given is used as is
        if model is not None:
            return model
        if not data or not isinstance(data[0], dict) or "id" not in data[0]:
            raise UserError(f"{self.base_url}/models lists no model: pass --model NAME")
        return data[0]["id"]

    def _answers(self) -> bool:
        try:
            self.client.get(self.base_url)
        except httpx.HTTPError:
            return False
        return True

    # ------------------------------------------------------------------ requests
    def loglikelihood(self, requests: Sequence[Any], progress: Progress = lambda n: None) -> list:
        raise UserError("log-likelihood tasks (mmlu, ppl) need prompt log-probs, which an OpenAI-compatible "
                        "server does not return: evaluate them with --checkpoint")

    loglikelihood_rolling = loglikelihood

    def _one(self, request: GenerateUntil) -> list[str]:
        body: dict[str, Any] = {
            "model": self.model, "max_tokens": request.max_gen_toks, "temperature": request.temperature,
            "top_p": request.top_p, "n": request.n,
        }
        if request.until:
            body["stop"] = list(request.until)
        if request.seed is not None:
            body["seed"] = request.seed
        if isinstance(request.context, str):
            out = self._call("POST", "/completions", {**body, "prompt": request.context})
            texts = [c.get("text") or "" for c in sorted(out["choices"], key=lambda c: c.get("index", 0))]
        else:
            out = self._call("POST", "/chat/completions", {**body, "messages": request.context})
            texts = [(c.get("message") or {}).get("content") or ""
                     for c in sorted(out["choices"], key=lambda c: c.get("index", 0))]
        if len(texts) != request.n:
            raise UserError(f"{self.base_url} returned {len(texts)} choices for n={request.n}")
        return [cut_at_stop(t, request.until) for t in texts]

    def generate_until(self, requests: Sequence[GenerateUntil], progress: Progress = lambda n: None) -> list[list[str]]:
        results: list[list[str]] = [[] for _ in requests]
        with ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="eval-api") as pool:
            futures = {pool.submit(self._one, r): i for i, r in enumerate(requests)}
            try:
                for future, i in futures.items():
                    results[i] = future.result()
                    progress(1)
            except BaseException:
                pool.shutdown(wait=False, cancel_futures=True)
                raise
        return results
