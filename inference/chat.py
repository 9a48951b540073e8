"""Streaming terminal chat with a checkpoint (multi-turn, the one ChatML chat template).

    python inference/chat.py --checkpoint runs/.../step_00001000 [--system TEXT]
        [--temperature 0.7 --top_p 0.9 --top_k 0 --max_new_tokens 256 --seed 0 ...]
    python inference/chat.py --checkpoint CKPT --prompt "Tell me a story"     # one shot, for scripts

Each reply streams token by token, then `[N tokens, X tok/s]` goes to stderr. The whole
conversation is re-encoded every turn with `engine.encode_chat` (the prefix cache makes the
repeated history cheap). Commands: `/reset` forgets the conversation (the system prompt
stays), `/quit` (or end of input) leaves. Ctrl-C while a reply streams stops that reply and
keeps the part already shown; Ctrl-C at the prompt leaves. `--prompt` prints only the reply on
stdout.
"""
from __future__ import annotations

import argparse
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, TextIO

from data_pipeline.formats import IM_END
from utils.errors import UserError, cli_main

COMMANDS = {"/reset": "forget the conversation", "/quit": "leave", "/help": "show this list"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="checkpoint directory (config.json + model.safetensors)")
    p.add_argument("--prompt", default=None, help="ask one question, print the reply, exit")
    p.add_argument("--system", default=None, help="system prompt placed before the conversation")
    p.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
    p.add_argument("--top_p", type=float, default=0.9)
    p.add_argument("--top_k", type=int, default=0, help="0 = off")
    p.add_argument("--min_p", type=float, default=0.0)
    p.add_argument("--repetition_penalty", type=float, default=1.0)
    p.add_argument("--presence_penalty", type=float, default=0.0)
    p.add_argument("--frequency_penalty", type=float, default=0.0)
    p.add_argument("--max_new_tokens", type=int, default=256,
                   help="reply length cap (also capped by what is left of the context)")
    p.add_argument("--seed", type=int, default=None, help="make sampling reproducible")
    p.add_argument("--adapter", default=None, help="LoRA adapter directory to apply")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    p.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16")
    return p.parse_args(argv)


@dataclass
class Reply:
    text: str
    num_tokens: int
    seconds: float
    finish_reason: Optional[str]

    @property
    def tokens_per_second(self) -> float:
        return self.num_tokens / self.seconds if self.seconds > 0 else 0.0


class _StopOnInterrupt:
    """While active, Ctrl-C sets a flag (checked between engine steps) instead of raising, so
    the engine is never interrupted half way through a step."""

    def __init__(self) -> None:
        self.requested = False

    def _handler(self, signum: int, frame: Any) -> None:
        self.requested = True

    def __enter__(self) -> "_StopOnInterrupt":
        self._previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc: object) -> None:
        signal.signal(signal.SIGINT, self._previous)


def stream_reply(engine: Any, prompt_ids: list[int], params: Any, out: TextIO) -> Reply:
    """Generate one reply, writing its text to `out` as it comes; Ctrl-C aborts it."""
    start = time.perf_counter()
    rid = engine.add_request(prompt_ids, params)
    parts: list[str] = []
    num_tokens, finish = 0, None
    with _StopOnInterrupt() as interrupt:
        while engine.has_unfinished():
            if interrupt.requested:
                engine.abort(rid)
                finish = "interrupted"
                break
            for o in engine.step():
                if o.request_id != rid:
                    continue
                parts.append(o.new_text)
                out.write(o.new_text)
                out.flush()
                num_tokens = o.completion_tokens
                if o.finished:
                    finish = o.finish_reason
    return Reply("".join(parts), num_tokens, time.perf_counter() - start, finish)


def build_params(args: argparse.Namespace, max_tokens: int, stop_token_ids: list[int]) -> Any:
    """SamplingParams from the flags (a bad value is a UserError)."""
    from inference.engine.sampling import SamplingParams

    try:
        return SamplingParams(
            temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
            repetition_penalty=args.repetition_penalty, presence_penalty=args.presence_penalty,
            frequency_penalty=args.frequency_penalty, seed=args.seed, max_tokens=max_tokens,
            stop_token_ids=stop_token_ids,
        )
    except ValueError as e:
        raise UserError(str(e).strip().splitlines()[0]) from None


def _stats(reply: Reply) -> str:
    note = {"length": ", cut at the length limit", "interrupted": ", interrupted"}.get(reply.finish_reason or "", "")
    return f"[{reply.num_tokens} tokens, {reply.tokens_per_second:.1f} tok/s{note}]"


def answer(args: argparse.Namespace, engine: Any, messages: list[dict[str, str]]) -> Reply:
    """Stream the reply to `messages` to stdout; it may use what is left of the context."""
    prompt_ids = engine.encode_chat(messages)
    room = engine.max_model_len - len(prompt_ids)
    if room <= 0:
        raise UserError(f"the conversation is {len(prompt_ids)} tokens, the model's context is "
                        f"{engine.max_model_len}: shorten it (or /reset)")
    im_end = engine.tokenizer.token_to_id(IM_END)  # the assistant turn ends here
    params = build_params(args, min(args.max_new_tokens, room), [] if im_end is None else [im_end])
    return stream_reply(engine, prompt_ids, params, sys.stdout)


def one_shot(args: argparse.Namespace, engine: Any, system: list[dict[str, str]]) -> None:
    reply = answer(args, engine, system + [{"role": "user", "content": args.prompt}])
    print(flush=True)
    print(_stats(reply), file=sys.stderr, flush=True)


def interactive(args: argparse.Namespace, engine: Any, system: list[dict[str, str]], name: str) -> None:
    if sys.stdin.isatty():
        import readline  # noqa: F401  (importing it gives input() line editing and history)
    print(f"chatting with {name} (context {engine.max_model_len} tokens). "
          f"/reset forgets the conversation, /quit leaves.", flush=True)
    history: list[dict[str, str]] = []
    while True:
        try:
            text = input("you> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return
        command = text.strip()
        if command == "/quit":
            return
        if command == "/reset":
            history.clear()
            print("(conversation cleared)", flush=True)
            continue
        if command == "/help":
            print("\n".join(f"{c:8s} {what}" for c, what in COMMANDS.items()), flush=True)
            continue
        if not command:
            continue
        history.append({"role": "user", "content": text})
        print("assistant> ", end="", flush=True)
        try:
            reply = answer(args, engine, system + history)
        except UserError as e:  # the conversation outgrew the context: say so, keep chatting
            history.pop()
            print(f"\n({e})", flush=True)
            continue
        print(flush=True)
        print(_stats(reply), file=sys.stderr, flush=True)
        history.append({"role": "assistant", "content": reply.text})


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not Path(args.checkpoint).is_dir():  # fail before the slow imports
        raise UserError(f"checkpoint not found: {args.checkpoint}")
    build_params(args, args.max_new_tokens, [])  # bad flags fail before the model loads
    from inference.engine.llm_engine import LLMEngine

    engine = LLMEngine(args.checkpoint, adapter=args.adapter, device=args.device, dtype=args.dtype, max_num_seqs=1)
    system = [{"role": "system", "content": args.system}] if args.system else []
    if args.prompt is not None:
        one_shot(args, engine, system)
    else:
        interactive(args, engine, system, Path(args.checkpoint).resolve().name)


if __name__ == "__main__":
    cli_main(main)
