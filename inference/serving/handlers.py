"""OpenAI chat and text completions on top of the engine: requests in, JSON or SSE out.

A request becomes token ids (the model's chat template through `engine.encode_chat`, or the
prompt as the tokenizer encodes it, with its BOS as in vLLM; token ids as given) and one `SamplingParams` per choice (`n` choices = `n` engine sequences, choice i
seeded with `seed + i`; sampling fields left unset take the model's generation_config.json
defaults, as in vLLM), checked against the context length, and is submitted to the shared
`AsyncEngine` as one `GenerationStream`. Non-streaming answers collect the stream; streaming
answers turn each engine step into server-sent events in OpenAI's chunk format, ending with
`data: [DONE]`. Semantics follow OpenAI's API reference: `usage.prompt_tokens` counts each
distinct prompt once, `finish_reason` is `stop` (an eos id, the end of the assistant turn or a
stop string, which is cut from the text) or `length`. Anything a request can cause (a bad
value, a conversation the chat template refuses, a model without a chat template, a prompt too
long) is a 4xx in OpenAI's error shape, never a 5xx.
"""
from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, Optional, TypeVar

from fastapi import Request
from fastapi.responses import Response, StreamingResponse
from starlette.background import BackgroundTask

from inference.engine.llm_engine import encode_text
from inference.engine.sampling import SamplingParams, with_generation_defaults
from inference.serving.async_engine import AsyncEngine, GenerationStream
from inference.serving.logprobs import TokenBytes, chat_logprobs, completion_logprobs
from inference.serving.protocol import (
    AssistantMessage, ChatChoice, ChatCompletion, ChatCompletionChunk, ChatCompletionRequest,
    ChoiceLogprobs, ChunkChoice, Completion, CompletionChoice, CompletionLogprobs,
    CompletionRequest, Delta, ErrorDetail, ErrorResponse, TokenLogprob, Usage, sse,
)
from utils.errors import UserError

T = TypeVar("T")


class ApiError(Exception):
    """An error answered in OpenAI's JSON shape with an HTTP status."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 type: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status = status
        self.detail = ErrorDetail(message=message, type=type, param=param, code=code)


@dataclass
class ServingContext:
    """What every handler needs: the engine, its async front, the served model name."""

    engine: Any  # inference.engine.llm_engine.LLMEngine
    async_engine: AsyncEngine
    model_name: str
    api_key: Optional[str] = None
    vocab_size: int = field(init=False)
    tokens: TokenBytes = field(init=False)  # token ids -> bytes / strings, for logprobs

    def __post_init__(self) -> None:
        if self.engine.tokenizer is None:
            raise UserError("this checkpoint has no tokenizer.json: the server needs one to read and write text")
        self.vocab_size = self.engine.tokenizer.get_vocab_size(with_added_tokens=True)
        self.tokens = TokenBytes(self.engine.tokenizer)

    def check_model(self, model: Optional[str]) -> None:
        if model is not None and model != self.model_name:
            raise ApiError(404, f"The model `{model}` does not exist (this server serves `{self.model_name}`).",
                           "model", "model_not_found")


# ---------------------------------------------------------------------------- request → engine
def max_tokens_for(ctx: ServingContext, prompt_len: int, requested: Optional[int], param: str) -> Optional[int]:
    """The completion budget: `requested`, or None (the engine runs to the end of the context or
    KV pool). Raises a 400 when the prompt alone fills the context or prompt + budget exceeds it
    (as OpenAI does)."""
    ctx_len = ctx.engine.max_model_len
    if prompt_len >= ctx_len:
        raise ApiError(400, f"This model's maximum context length is {ctx_len} tokens, but the prompt has "
                            f"{prompt_len} tokens. Please reduce the length of the {param}.",
                       param, "context_length_exceeded")
    if requested is not None and prompt_len + requested > ctx_len:
        raise ApiError(400, f"This model's maximum context length is {ctx_len} tokens. However, you requested "
                            f"{prompt_len + requested} tokens ({prompt_len} in the {param}, {requested} in the "
                            f"completion). Please reduce the length of the {param} or completion.",
                       "max_tokens", "context_length_exceeded")
    return requested


def _bad_request(e: Exception, param: Optional[str] = None) -> ApiError:
    """A ValueError / UserError about the request as a 400 with its first line."""
    return ApiError(400, str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__, param)


def sampling_params(ctx: ServingContext, req: ChatCompletionRequest | CompletionRequest, max_tokens: Optional[int],
                    logprobs: Optional[int], stop_token_ids: list[int], choice: int) -> SamplingParams:
    try:
        return with_generation_defaults(
            ctx.engine.generation_defaults,
            temperature=req.temperature, top_p=req.top_p,
            top_k=req.top_k, min_p=req.min_p, repetition_penalty=req.repetition_penalty,
            presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
            seed=None if req.seed is None else req.seed + choice,
            stop=req.stop_list(), stop_token_ids=stop_token_ids, max_tokens=max_tokens, logprobs=logprobs,
            ignore_eos=req.ignore_eos,
        )
    except ValueError as e:
        raise _bad_request(e) from None


async def submit(ctx: ServingContext, pairs: list[tuple[list[int], SamplingParams]]) -> GenerationStream:
    try:
        return await ctx.async_engine.submit(pairs)
    except (ValueError, UserError) as e:
        raise _bad_request(e) from None


async def until_disconnect(request: Request, stream: GenerationStream, work: Awaitable[T]) -> T | Response:
    """Await `work` (which consumes `stream`); if the client goes away first, cancel it and
    abort the stream's sequences."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watch = asyncio.ensure_future(disconnected())
    try:
        done, _ = await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
    if task not in done:  # the client left
        with contextlib.suppress(asyncio.CancelledError):
            await task
        stream.abort()  # (the work may have been cancelled before it entered `async with stream`)
        return Response(status_code=499)  # nobody is listening any more
    return task.result()


def event_stream(stream: GenerationStream, events: AsyncIterator[str]) -> StreamingResponse:
    """Server-sent events. The generator aborts its sequences when the client disconnects
    mid-stream; the background abort covers a disconnect before the generator ever started."""
    async def abort() -> None:  # async: runs on the event loop, not in a worker thread
        stream.abort()

    return StreamingResponse(events, media_type="text/event-stream", background=BackgroundTask(abort))


def _error_event(e: Exception) -> str:
    return sse(ErrorResponse(error=ErrorDetail(message=str(e), type="server_error")))


# ---------------------------------------------------------------------------- chat completions
async def chat_completion(ctx: ServingContext, req: ChatCompletionRequest, request: Request) -> Any:
    ctx.check_model(req.model)
    if req.stream_options is not None and not req.stream:
        raise ApiError(400, "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
                       "stream_options")
    if req.top_logprobs is not None and not req.logprobs:
        raise ApiError(400, "'top_logprobs' requires 'logprobs' to be true.", "top_logprobs")
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in req.messages]
    try:
        prompt = ctx.engine.encode_chat(messages, req.chat_template_kwargs)
        stop_ids = list(ctx.engine.chat_stop_token_ids)
    except (ValueError, UserError) as e:  # the template refused the conversation / the model has none
        raise _bad_request(e, "messages") from None
    requested = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    max_tokens = max_tokens_for(ctx, len(prompt), requested, "messages")
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    params = [sampling_params(ctx, req, max_tokens, logprobs, stop_ids, i) for i in range(req.n)]
    stream = await submit(ctx, [(prompt, p) for p in params])
    rid = f"chatcmpl-{uuid.uuid4().hex}"
    if req.stream:
        include_usage = req.stream_options is not None and req.stream_options.include_usage
        return event_stream(stream, _chat_events(ctx, stream, rid, req.n, len(prompt), include_usage, req.logprobs))
    return await until_disconnect(request, stream, _chat_collect(ctx, stream, rid, req.n, len(prompt), req.logprobs))


async def _chat_collect(ctx: ServingContext, stream: GenerationStream, rid: str, n: int, prompt_len: int,
                        want_logprobs: bool) -> ChatCompletion:
    texts: list[list[str]] = [[] for _ in range(n)]
    lps: list[list[TokenLogprob]] = [[] for _ in range(n)]
    finish: list[Optional[str]] = [None] * n
    completion = 0
    async with stream:
        async for i, out in stream:
            texts[i].append(out.new_text)
            if want_logprobs:
                lps[i] += chat_logprobs(ctx.tokens, out)
            if out.finished:
                finish[i] = out.finish_reason
                completion += out.completion_tokens
    choices = [ChatChoice(index=i, message=AssistantMessage(content="".join(texts[i])), finish_reason=finish[i],
                          logprobs=ChoiceLogprobs(content=lps[i]) if want_logprobs else None) for i in range(n)]
    return ChatCompletion(id=rid, model=ctx.model_name, choices=choices,
                          usage=Usage(prompt_tokens=prompt_len, completion_tokens=completion,
                                      total_tokens=prompt_len + completion))


async def _chat_events(ctx: ServingContext, stream: GenerationStream, rid: str, n: int, prompt_len: int,
                       include_usage: bool, want_logprobs: bool) -> AsyncIterator[str]:
    created = int(time.time())

    def chunk(choices: list[ChunkChoice], usage: Optional[Usage] = None) -> str:
        return sse(ChatCompletionChunk(id=rid, created=created, model=ctx.model_name, choices=choices, usage=usage))

    completion = 0
    async with stream:
        for i in range(n):
            yield chunk([ChunkChoice(index=i, delta=Delta(role="assistant", content=""))])
        try:
            async for i, out in stream:
                lp = ChoiceLogprobs(content=chat_logprobs(ctx.tokens, out)) if want_logprobs else None
                if out.new_text or (lp is not None and lp.content):
                    yield chunk([ChunkChoice(index=i, delta=Delta(content=out.new_text), logprobs=lp)])
                if out.finished:
                    completion += out.completion_tokens
                    yield chunk([ChunkChoice(index=i, delta=Delta(), finish_reason=out.finish_reason)])
        except Exception as e:  # the engine failed mid-stream: the status line is long sent
            yield _error_event(e)
            yield sse("[DONE]")
            return
    if include_usage:
        yield chunk([], Usage(prompt_tokens=prompt_len, completion_tokens=completion,
                              total_tokens=prompt_len + completion))
    yield sse("[DONE]")


# ---------------------------------------------------------------------------- text completions
def _prompts(ctx: ServingContext, prompt: Any) -> list[list[int]]:
    """The request's prompt(s) as token id lists: a string, strings, ids, or lists of ids."""
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        prompt = [prompt]
    out = []
    for p in prompt:
        ids = encode_text(ctx.engine.tokenizer, p) if isinstance(p, str) else list(p)
        if not ids:
            raise ApiError(400, "The prompt is empty.", "prompt")
        bad = [t for t in ids if not 0 <= t < ctx.vocab_size]
        if bad:
            raise ApiError(400, f"Token id {bad[0]} is out of range [0, {ctx.vocab_size}).", "prompt")
        out.append(ids)
    if not out:
        raise ApiError(400, "The prompt is empty.", "prompt")
    return out


async def completion(ctx: ServingContext, req: CompletionRequest, request: Request) -> Any:
    ctx.check_model(req.model)
    if req.stream_options is not None and not req.stream:
        raise ApiError(400, "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
                       "stream_options")
    prompts = _prompts(ctx, req.prompt)
    requested = 16 if req.max_tokens is None else req.max_tokens  # OpenAI's default for this endpoint
    pairs = []
    for p in prompts:
        max_tokens = max_tokens_for(ctx, len(p), requested, "prompt")
        pairs += [(p, sampling_params(ctx, req, max_tokens, req.logprobs, [], j)) for j in range(req.n)]
    stream = await submit(ctx, pairs)
    rid = f"cmpl-{uuid.uuid4().hex}"
    prompt_tokens = sum(len(p) for p in prompts)
    if req.stream:
        include_usage = req.stream_options is not None and req.stream_options.include_usage
        return event_stream(stream, _completion_events(ctx, stream, rid, prompt_tokens, include_usage, req.logprobs))
    return await until_disconnect(request, stream, _completion_collect(ctx, stream, rid, len(pairs), prompt_tokens,
                                                                       req.logprobs))


async def _completion_collect(ctx: ServingContext, stream: GenerationStream, rid: str, n: int,
                              prompt_tokens: int, logprobs: Optional[int]) -> Completion:
    texts: list[list[str]] = [[] for _ in range(n)]
    lps = [CompletionLogprobs(top_logprobs=[]) for _ in range(n)]
    finish: list[Optional[str]] = [None] * n
    offsets = [0] * n
    completion_tokens = 0
    async with stream:
        async for i, out in stream:
            texts[i].append(out.new_text)
            if logprobs is not None:
                part = completion_logprobs(ctx.tokens, out, offsets[i])
                for name in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
                    getattr(lps[i], name).extend(getattr(part, name))
            offsets[i] += len(out.new_text)
            if out.finished:
                finish[i] = out.finish_reason
                completion_tokens += out.completion_tokens
    choices = [CompletionChoice(index=i, text="".join(texts[i]), finish_reason=finish[i],
                                logprobs=lps[i] if logprobs is not None else None) for i in range(n)]
    return Completion(id=rid, model=ctx.model_name, choices=choices,
                      usage=Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                                  total_tokens=prompt_tokens + completion_tokens))


async def _completion_events(ctx: ServingContext, stream: GenerationStream, rid: str, prompt_tokens: int,
                             include_usage: bool, logprobs: Optional[int]) -> AsyncIterator[str]:
    created = int(time.time())
    offsets: dict[int, int] = {}
    completion_tokens = 0
    async with stream:
        try:
            async for i, out in stream:
                lp = completion_logprobs(ctx.tokens, out, offsets.get(i, 0)) if logprobs is not None else None
                offsets[i] = offsets.get(i, 0) + len(out.new_text)
                if out.finished:
                    completion_tokens += out.completion_tokens
                if out.new_text or out.finished or lp is not None:
                    choice = CompletionChoice(index=i, text=out.new_text, logprobs=lp,
                                              finish_reason=out.finish_reason if out.finished else None)
                    yield sse(Completion(id=rid, created=created, model=ctx.model_name, choices=[choice]))
        except Exception as e:  # the engine failed mid-stream: the status line is long sent
            yield _error_event(e)
            yield sse("[DONE]")
            return
    if include_usage:
        yield sse(Completion(id=rid, created=created, model=ctx.model_name, choices=[],
                             usage=Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                                         total_tokens=prompt_tokens + completion_tokens)))
    yield sse("[DONE]")
