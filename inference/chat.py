"""Streaming terminal chat with a checkpoint (multi-turn, in the model's chat template).

    python inference/chat.py --checkpoint runs/.../step_00001000 [--system TEXT]
        [--temperature 0.7 --top_p 0.9 --top_k 0 --max_new_tokens 256 --seed 0 ...]
    python inference/chat.py --checkpoint CKPT --prompt "Tell me a story"     # one shot, for scripts

The checkpoint may be one of ours (ChatML) or an imported Hugging Face chat model (its own
template and end-of-turn tokens; sampling flags left out take its generation_config.json
defaults, else the defaults shown). Each reply streams token by token, then `[N tokens, X tok/s]`
goes to stderr. The whole conversation is re-encoded every turn with `engine.encode_chat` (the
prefix cache makes the repeated history cheap). When it no longer fits what one sequence may
hold (the context length or the KV cache, whichever is smaller) with room for the reply, the
oldest exchanges are dropped, with a note; a single message that does not fit is refused and
the chat goes on. Commands: `/reset` forgets the conversation (the system prompt stays),
`/quit` (or end of input) leaves. Ctrl-C while a reply streams stops that reply and keeps the
part already shown; Ctrl-C at the prompt leaves. `--prompt` prints only the reply on stdout.
"""
from __future__ import annotations

import argparse
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, TextIO

from utils.errors import UserError, cli_main

COMMANDS = {"/reset": "forget the conversation", "/quit": "leave", "/help": "show this list"}
# Sampling defaults when neither a flag nor the model's generation_config.json sets them
SAMPLING_DEFAULTS = {"temperature": 0.7, "top_p": 0.9, "top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0}
Messages = list[dict[str, str]]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="checkpoint directory (config.json + model.safetensors)")
    p.add_argument("--prompt", default=None, help="ask one question, print the reply, exit")
    p.add_argument("--system", default=None, help="system prompt placed before the conversation")
    model_default = "default: the model's generation_config.json, else %s"
    p.add_argument("--temperature", type=float, default=None, help="0 = greedy (" + model_default % 0.7 + ")")
    p.add_argument("--top_p", type=float, default=None, help=model_default % 0.9)
    p.add_argument("--top_k", type=int, default=None, help="0 = off (" + model_default % 0 + ")")
    p.add_argument("--min_p", type=float, default=None, help=model_default % 0.0)
    p.add_argument("--repetition_penalty", type=float, default=None, help=model_default % 1.0)
    p.add_argument("--presence_penalty", type=float, default=0.0)
    p.add_argument("--frequency_penalty", type=float, default=0.0)
    p.add_argument("--max_new_tokens", type=int, default=256,
                   help="reply length cap (also capped by what is left of the context)")
    p.add_argument("--seed", type=int, default=None, help="make sampling reproducible")
    p.add_argument("--adapter", default=None, help="LoRA adapter directory to apply")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    p.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16")
    p.add_argument("--quantize", default=None, choices=["int8"],
                   help="weight-only int8 on the CPU (torch's packed kernel; about 1/4 of the fp32 weight bytes)")
    p.add_argument("--compile", action="store_true",
                   help="compile the decode step (torch.compile: one graph per batch-size / context bucket, built "
                        "on first use in seconds to a minute, then replayed; eager with a warning where it fails)")
    p.add_argument("--kv_cache_memory_mb", type=float, default=None,
                   help="KV cache size; it bounds how long a conversation can grow (default: from free memory)")
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


def build_params(args: argparse.Namespace, max_tokens: int, stop_token_ids: list[int],
                 model_defaults: Optional[dict[str, float]] = None) -> Any:
    """SamplingParams from the flags; a sampling flag left out takes the model's default
    (generation_config.json), else `SAMPLING_DEFAULTS` (a bad value is a UserError)."""
    from inference.engine.sampling import with_generation_defaults

    defaults = {**SAMPLING_DEFAULTS, **(model_defaults or {})}
    try:
        return with_generation_defaults(
            defaults, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
            repetition_penalty=args.repetition_penalty, presence_penalty=args.presence_penalty,
            frequency_penalty=args.frequency_penalty, seed=args.seed, max_tokens=max_tokens,
            stop_token_ids=stop_token_ids,
        )
    except ValueError as e:
        raise UserError(str(e).strip().splitlines()[0]) from None


def _stats(reply: Reply) -> str:
    note = {"length": ", cut at the length limit", "interrupted": ", interrupted"}.get(reply.finish_reason or "", "")
    return f"[{reply.num_tokens} tokens, {reply.tokens_per_second:.1f} tok/s{note}]"


def fit_history(encode: Callable[[Messages], list[int]], system: Messages, history: Messages, capacity: int,
                budget: int) -> tuple[list[int], int]:
    """(prompt ids, k): the prompt of system + history[k:], where k (even: whole exchanges of a
    user turn and its reply) is the fewest oldest messages to drop for the prompt to leave
    `budget` tokens of `capacity`; at most everything before the last user turn is dropped."""
    dropped = 0
    while True:
        ids = encode(system + history[dropped:])
        if len(ids) + budget <= capacity or len(history) - dropped <= 1:
            return ids, dropped
        dropped += 2


def prepare(args: argparse.Namespace, engine: Any, system: Messages, history: Messages) -> tuple[list[int], Any]:
    """Prompt ids and SamplingParams for a reply to system + history (ending with the user's turn).

    The oldest exchanges are dropped from `history` (with a note) while the prompt leaves less
    than --max_new_tokens of what one sequence may hold; the reply may then use what is left.
    UserError when even the last message alone leaves no room."""
    capacity = engine.max_seq_len  # the context length or the whole KV pool, whichever is smaller
    try:
        prompt_ids, dropped = fit_history(engine.encode_chat, system, history, capacity, args.max_new_tokens)
    except ValueError as e:  # the chat template refused the conversation
        raise UserError(str(e)) from None
    room = capacity - len(prompt_ids)
    limit = (f"the KV cache holds {capacity} tokens (raise --kv_cache_memory_mb)"
             if capacity < engine.max_model_len else f"the model's context is {capacity} tokens")
    if room <= 0:
        raise UserError(f"the message makes the prompt {len(prompt_ids)} tokens and {limit}: shorten it")
    if dropped:
        del history[:dropped]
        print(f"(the conversation outgrew what fits: {limit}; dropped the oldest {dropped // 2} "
              f"exchange{'s' if dropped > 2 else ''})", flush=True)
    stops = list(engine.chat_stop_token_ids)  # besides the eos ids, what ends the assistant turn
    return prompt_ids, build_params(args, min(args.max_new_tokens, room), stops, engine.generation_defaults)


def one_shot(args: argparse.Namespace, engine: Any, system: Messages) -> None:
    prompt_ids, params = prepare(args, engine, system, [{"role": "user", "content": args.prompt}])
    reply = stream_reply(engine, prompt_ids, params, sys.stdout)
    print(flush=True)
    print(_stats(reply), file=sys.stderr, flush=True)


def interactive(args: argparse.Namespace, engine: Any, system: list[dict[str, str]], name: str) -> None:
    if sys.stdin.isatty():
        import readline  # noqa: F401  (importing it gives input() line editing and history)
    print(f"chatting with {name} (context {engine.max_seq_len} tokens). "
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
        try:
            prompt_ids, params = prepare(args, engine, system, history)
        except UserError as e:  # the message does not fit, or the template refused it: say so, go on
            history.pop()
            print(f"({e})", flush=True)
            continue
        print("assistant> ", end="", flush=True)
        reply = stream_reply(engine, prompt_ids, params, sys.stdout)
        print(flush=True)
        print(_stats(reply), file=sys.stderr, flush=True)
        history.append({"role": "assistant", "content": reply.text})


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not Path(args.checkpoint).is_dir():  # fail before the slow imports
        raise UserError(f"checkpoint not found: {args.checkpoint}")
    build_params(args, args.max_new_tokens, [])  # bad flags fail before the model loads
    from inference.engine.llm_engine import LLMEngine

    if args.compile:
        from inference.engine.compiled_decode import show_compile_progress

        show_compile_progress()
    engine = LLMEngine(args.checkpoint, adapter=args.adapter, device=args.device, dtype=args.dtype, max_num_seqs=1,
                       kv_cache_memory_mb=args.kv_cache_memory_mb, quantize=args.quantize, compile=args.compile)
    system = [{"role": "system", "content": args.system}] if args.system else []
    if args.prompt is not None:
        one_shot(args, engine, system)
    else:
        interactive(args, engine, system, Path(args.checkpoint).resolve().name)


if __name__ == "__main__":
    cli_main(main)
