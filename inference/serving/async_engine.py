"""An asyncio front for the continuous-batching `LLMEngine`: one engine thread, many requests.

The engine is not thread-safe and its `step()` blocks (a forward pass), so exactly one
background thread owns it: it runs `engine.step()` while any request is unfinished and sleeps
on a condition variable otherwise (no spinning). Everything the asyncio side wants done to the
engine — add requests, abort them — is posted to that thread as a command and runs between two
steps. Each HTTP request gets one `GenerationStream`: an `asyncio.Queue` fed by the engine
thread through `loop.call_soon_threadsafe`, yielding `(choice index, StepOutput)` pairs for its
one or more sequences (n > 1). Leaving a stream early (client disconnect, cancellation) aborts
its unfinished sequences, which frees their KV blocks. The design follows vLLM's
AsyncLLMEngine (Kwon et al., 2023, "Efficient Memory Management for Large Language Model
Serving with PagedAttention"), reduced to one thread and one queue per request.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import uuid
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

log = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine thread stopped (shut down or crashed); no request can be served."""


@dataclass
class _Sink:
    """Where the engine thread delivers one sequence's outputs."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    index: int


def _deliver(items: list[tuple[asyncio.Queue, Any]]) -> None:
    """Runs on the event loop: hand the engine thread's outputs to their queues."""
    for queue, item in items:
        queue.put_nowait(item)


def _call_soon(loop: asyncio.AbstractEventLoop, fn: Callable[..., None], *args: Any) -> None:
    """Schedule `fn(*args)` on `loop` from the engine thread; a closed loop has no one to tell."""
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:
        log.debug("event loop closed; dropped a delivery")


def _resolve(fut: asyncio.Future, result: Any = None, error: Optional[BaseException] = None) -> None:
    if fut.done():  # the waiting request was cancelled meanwhile
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(result)


class GenerationStream:
    """The outputs of one request's sequences, as an async iterator of `(index, StepOutput)`.

    Iteration ends once every sequence has finished. Use it as an async context manager:
    leaving the block before that (an exception, a cancelled task, a closed generator) aborts
    the sequences still running.
    """

    def __init__(self, owner: "AsyncEngine", request_ids: list[str], queue: asyncio.Queue) -> None:
        self.request_ids = request_ids
        self._owner = owner
        self._queue = queue
        self._pending = set(request_ids)

    @property
    def finished(self) -> bool:
        return not self._pending

    def __aiter__(self) -> "GenerationStream":
        return self

    async def __anext__(self) -> tuple[int, Any]:
        if not self._pending:
            raise StopAsyncIteration
        item = await self._queue.get()
        if isinstance(item, BaseException):
            self._pending.clear()
            raise item
        index, out = item
        if out.finished:
            self._pending.discard(out.request_id)
        return index, out

    def abort(self) -> None:
        """Abort the unfinished sequences (synchronous, so it is safe while being cancelled)."""
        if self._pending:
            self._owner.abort(list(self._pending))
            self._pending.clear()

    async def __aenter__(self) -> "GenerationStream":
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.abort()


class AsyncEngine:
    """Owns an `LLMEngine` and the one thread that steps it. `start()` before use."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self._cv = threading.Condition()
        self._commands: deque[Callable[[], None]] = deque()
        self._sinks: dict[str, _Sink] = {}  # written only by the engine thread
        self._thread: Optional[threading.Thread] = None
        self._stopping = False
        self._ids = itertools.count()
        self.num_aborted = 0  # sequences aborted before they finished (disconnects, cancels)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("AsyncEngine already started")
        self._thread = threading.Thread(target=self._run, name="llm-engine", daemon=True)
        self._thread.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the engine thread after its current step; pending requests get EngineDeadError."""
        with self._cv:
            self._stopping = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    @property
    def num_running(self) -> int:
        """Sequences added and not yet finished or aborted."""
        return len(self._sinks)

    # ------------------------------------------------------------------ asyncio side
    async def submit(self, requests: Sequence[tuple[Any, Any]]) -> GenerationStream:
        """Add `(prompt, SamplingParams)` pairs as one request's sequences (choice i = pair i).

        Returns once the engine thread has accepted all of them; an error from
        `engine.add_request` (e.g. a ValueError for a prompt too long) is raised here and
        none of the pairs stays in the engine.
        """
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        accepted: asyncio.Future = loop.create_future()
        base = f"{uuid.uuid4().hex[:16]}-{next(self._ids)}"

        def add() -> None:  # engine thread
            added: list[str] = []
            try:
                for i, (prompt, params) in enumerate(requests):
                    rid = self.engine.add_request(prompt, params, request_id=f"{base}-{i}")
                    self._sinks[rid] = _Sink(loop, queue, i)
                    added.append(rid)
            except Exception as e:  # the add failed: take back the part already added
                for rid in added:
                    self.engine.abort(rid)
                    del self._sinks[rid]
                _call_soon(loop, _resolve, accepted, None, e)
                return
            _call_soon(loop, _resolve, accepted, added)

        if self._thread is None or not self._post(add):
            raise EngineDeadError("the engine is not running")
        try:
            request_ids = await accepted
        except asyncio.CancelledError:
            # The add may still run (or have run): abort whatever reached this queue's sinks.
            self._post(lambda: self._abort_matching(lambda rid, sink: sink.queue is queue))
            raise
        return GenerationStream(self, request_ids, queue)

    def abort(self, request_ids: list[str]) -> None:
        """Abort sequences (thread-safe, non-blocking; a finished one is left alone)."""
        ids = set(request_ids)
        self._post(lambda: self._abort_matching(lambda rid, sink: rid in ids))

    # ------------------------------------------------------------------ engine thread
    def _post(self, command: Callable[[], None]) -> bool:
        """Queue a command for the engine thread; False (and dropped) once shutting down."""
        with self._cv:
            if self._stopping:
                return False
            self._commands.append(command)
            self._cv.notify()
            return True

    def _abort_matching(self, match: Callable[[str, _Sink], bool]) -> None:
        for rid in [r for r, s in self._sinks.items() if match(r, s)]:
            self.engine.abort(rid)
            del self._sinks[rid]
            self.num_aborted += 1

    def _run(self) -> None:
        while True:
            with self._cv:
                while not (self._commands or self._stopping or self.engine.has_unfinished()):
                    self._cv.wait()
                commands = list(self._commands)
                self._commands.clear()
                stopping = self._stopping
            for command in commands:
                try:
                    command()
                except Exception:  # a failed abort must not take the engine thread down
                    log.exception("engine command failed")
            if stopping:
                break
            if self.engine.has_unfinished():
                try:
                    outputs = self.engine.step()
                except Exception as e:  # a bug in the engine: fail the requests, keep serving
                    log.exception("engine step failed")
                    self._fail_all(e)
                    continue
                self._dispatch(outputs)
        self._fail_all(EngineDeadError("the engine was shut down"))

    def _dispatch(self, outputs: list[Any]) -> None:
        per_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, Any]]] = {}
        for out in outputs:
            sink = self._sinks.get(out.request_id)
            if sink is None:  # aborted after this step began
                continue
            if out.finished:
                del self._sinks[out.request_id]
            per_loop.setdefault(sink.loop, []).append((sink.queue, (sink.index, out)))
        for loop, items in per_loop.items():
            _call_soon(loop, _deliver, items)

    def _fail_all(self, error: BaseException) -> None:
        queues: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        for rid, sink in list(self._sinks.items()):
            try:
                self.engine.abort(rid)
            except Exception:
                log.exception("abort of %s failed", rid)
            queues[id(sink.queue)] = (sink.loop, sink.queue)
        self._sinks.clear()
        for loop, queue in queues.values():
            _call_soon(loop, queue.put_nowait, error)
