"""Helpers for the chat CLI / server / web page tests (no test functions here).

- `make_checkpoint(dir)`: a tiny random `tiny-llama3` model + a tiny HF ByteLevel BPE tokenizer
  with the project's 4 special tokens, saved as a real checkpoint the `LLMEngine` loads.
- `ScriptedEngine`: a stand-in with the `LLMEngine` interface whose sequences emit a fixed
  token script, for unit tests of the async layer (deterministic steps, counted calls).
- `LiveServer`: uvicorn on 127.0.0.1 (a free port) in a background thread;
  `serve_checkpoint(dir)`: the real `LLMEngine` on a checkpoint behind one.
"""
from __future__ import annotations

import socket
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import uvicorn

from data_pipeline.formats import IM_END
from data_pipeline.tokenizer.io import write_hf_configs
from data_pipeline.tokenizer.train_tokenizer import train_hf
from inference.engine.llm_engine import StepOutput  # the fake emits the real engine's records

STORIES = [
    "Once upon a time there was a little cat. The cat liked to play in the sun.",
    "Tom had a red ball. He gave the ball to his friend Sue and they played all day.",
    "The sky was blue and the birds sang. A small dog ran to the park with a stick.",
    "Lily found a shiny stone by the river. She smiled and showed it to her mom.",
] * 8


def make_tokenizer(directory: Path, vocab_size: int = 320) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    train_hf(STORIES, vocab_size).save(str(directory / "tokenizer.json"))
    write_hf_configs(directory)
    return directory


def make_checkpoint(directory: Path, max_seq_len: int = 1024, seed: int = 0) -> Path:
    """A tiny random model + tokenizer saved as a checkpoint directory."""
    import torch

    from model import build_model, get_preset
    from tokenizers import Tokenizer
    from utils.checkpoint import save_checkpoint

    tok_dir = make_tokenizer(directory.parent / f"{directory.name}-tokenizer")
    vocab = Tokenizer.from_file(str(tok_dir / "tokenizer.json")).get_vocab_size()
    cfg = get_preset("tiny-llama3", vocab_size=vocab, max_seq_len=max_seq_len)
    torch.manual_seed(seed)
    model = build_model(cfg)
    return save_checkpoint(directory, model.state_dict(), cfg.model_dump(), tokenizer_dir=tok_dir)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """Serve an ASGI app with uvicorn on 127.0.0.1 in a daemon thread (context manager)."""

    def __init__(self, app: Any) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "LiveServer":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)


# ---------------------------------------------------------------------------- a scripted engine
@dataclass
class _Seq:
    rid: str
    prompt: list[int]
    params: Any
    out: list[int] = field(default_factory=list)


class ScriptedEngine:
    """The `LLMEngine` interface without a model: sequence k emits `script[(k + i) % len]`.

    Each sequence holds one block per started group of 4 tokens; `step()` advances every
    running sequence by one token and counts its calls, `delay` seconds each.
    """

    def __init__(self, tokenizer: Any, script: list[int], total_blocks: int = 256, max_model_len: int = 512,
                 delay: float = 0.0) -> None:
        self.tokenizer = tokenizer
        self.eos_token_id = 0
        self.generation_defaults: dict[str, float] = {}
        self.chat_stop_token_ids: list[int] = []
        self.max_model_len = max_model_len
        self.num_total_blocks = total_blocks
        self.script = script
        self.delay = delay
        self.steps = 0
        self.aborted: list[str] = []
        self._seqs: dict[str, _Seq] = {}
        self._n = 0
        self.fail_next_step: Optional[Exception] = None

    def encode_chat(self, messages: list[dict[str, str]], template_kwargs: Optional[dict] = None) -> list[int]:
        text = "".join(f"{IM_END}{m['role']}\n{m['content']}" for m in messages)
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    @property
    def num_free_blocks(self) -> int:
        return self.num_total_blocks - sum((len(s.prompt) + len(s.out) + 3) // 4 for s in self._seqs.values())

    def add_request(self, prompt: Any, params: Any, request_id: Optional[str] = None) -> str:
        if len(prompt) >= self.max_model_len:
            raise ValueError(f"prompt of {len(prompt)} tokens does not fit {self.max_model_len}")
        rid = request_id or f"r{self._n}"
        self._seqs[rid] = _Seq(rid, list(prompt), params)
        self._n += 1
        return rid

    def abort(self, request_id: str) -> None:
        if self._seqs.pop(request_id, None) is not None:
            self.aborted.append(request_id)

    def has_unfinished(self) -> bool:
        return bool(self._seqs)

    def step(self) -> list[StepOutput]:
        self.steps += 1
        if self.fail_next_step is not None:
            e, self.fail_next_step = self.fail_next_step, None
            raise e
        time.sleep(self.delay)
        outs = []
        for k, s in enumerate(list(self._seqs.values())):
            tid = self.script[(k + len(s.out)) % len(self.script)]
            s.out.append(tid)
            done = len(s.out) >= s.params.max_tokens
            if done:
                del self._seqs[s.rid]
            lp = None if s.params.logprobs is None else [(tid, -0.5, [(tid, -0.5)] * s.params.logprobs)]
            outs.append(StepOutput(s.rid, [tid], self.tokenizer.decode([tid]), done, "length" if done else None,
                                   lp, len(s.prompt), len(s.out)))
        return outs


@contextmanager
def serve_checkpoint(checkpoint: Path, model_name: str = "tiny-test", api_key: Optional[str] = None,
                     **engine_kwargs: Any) -> Iterator[tuple[Any, LiveServer]]:
    """The real `LLMEngine` on `checkpoint` (CPU, float32, a small KV pool) behind a live server."""
    from inference.engine.llm_engine import LLMEngine
    from inference.serving import create_app

    kwargs = dict(device="cpu", dtype="float32", kv_cache_memory_mb=4, **engine_kwargs)
    engine = LLMEngine(checkpoint, **kwargs)
    with LiveServer(create_app(engine, model_name, api_key)) as server:
        yield engine, server
