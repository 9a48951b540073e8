"""Generate a continuation of one prompt with a checkpoint (the offline engine, from the shell).

    python inference/generate.py --checkpoint runs/.../step_00001000 --prompt "Once upon a time"
        [--max_new_tokens N --temperature 0.8 --top_p 1.0 --top_k 0 --seed 0]
        [--json] [--adapter LORA_DIR] [--draft SMALL_CKPT --num_speculative_tokens 4] [--chat]

Without ``--max_new_tokens`` the continuation is up to 128 tokens, fewer when the prompt leaves
less of the model's context (a note on stderr says so); an explicit ``--max_new_tokens`` that
does not fit is an error. The text streams to stdout as it is generated, then
``[N tokens, X tok/s, finish reason]`` goes to stderr. ``--json`` prints one JSON object
instead (text, token ids, finish reason, timing, and with ``--draft`` the speculative-decoding
acceptance rate). ``--chat`` wraps the prompt as a user message in the chat template and stops
at the end of the assistant turn. The checkpoint
may be one of ours or a Hugging Face directory; ``--draft`` is a smaller model with the same
tokenizer for speculative decoding (Leviathan et al., 2023).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from utils.errors import UserError, cli_main

DEFAULT_MAX_NEW_TOKENS = 128


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="checkpoint or Hugging Face model directory")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max_new_tokens", type=int, default=None,
                   help=f"tokens to generate (default {DEFAULT_MAX_NEW_TOKENS}, capped by what is left of the "
                        "context; an explicit value that does not fit is an error)")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top_p", type=float, default=1.0)
    p.add_argument("--top_k", type=int, default=0, help="0 = off")
    p.add_argument("--seed", type=int, default=None, help="make sampling reproducible")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the text")
    p.add_argument("--adapter", default=None, help="LoRA adapter directory to apply")
    p.add_argument("--draft", default=None, help="draft checkpoint for speculative decoding")
    p.add_argument("--num_speculative_tokens", type=int, default=4, help="draft tokens per step (with --draft)")
    p.add_argument("--chat", action="store_true", help="treat the prompt as a user message (chat template)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    p.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16")
    p.add_argument("--quantize", default=None, choices=["int8"],
                   help="weight-only int8 on the CPU (torch's packed kernel; about 1/4 of the fp32 weight bytes)")
    p.add_argument("--compile", action="store_true",
                   help="compile the decode step (torch.compile: one graph per batch-size / context bucket, built "
                        "on first use in seconds to a minute, then replayed; eager with a warning where it fails)")
    return p.parse_args(argv)


def build_params(args: argparse.Namespace, max_tokens: int, stop_token_ids: list[int]) -> Any:
    from inference.engine.sampling import SamplingParams

    try:
        return SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed,
                              max_tokens=max_tokens, stop_token_ids=stop_token_ids)
    except ValueError as e:
        raise UserError(str(e)) from None


def default_max_tokens(prompt_len: int, max_model_len: int) -> int:
    """The length used when the user gave none: `DEFAULT_MAX_NEW_TOKENS`, or what is left of the
    context after the prompt when that is less (at least 1, so a too-long prompt still gets the
    engine's own error naming its length)."""
    return max(1, min(DEFAULT_MAX_NEW_TOKENS, max_model_len - prompt_len))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise UserError(f"--max_new_tokens must be >= 1, got {args.max_new_tokens}")
    if args.num_speculative_tokens < 1:
        raise UserError(f"--num_speculative_tokens must be >= 1, got {args.num_speculative_tokens}")
    build_params(args, args.max_new_tokens or DEFAULT_MAX_NEW_TOKENS, [])  # bad flags fail before the model loads
    from inference.engine.llm_engine import LLMEngine, encode_text

    if args.compile:
        from inference.engine.compiled_decode import show_compile_progress

        show_compile_progress()
    engine = LLMEngine(args.checkpoint, adapter=args.adapter, device=args.device, dtype=args.dtype, max_num_seqs=1,
                       draft_checkpoint=args.draft, num_speculative_tokens=args.num_speculative_tokens,
                       quantize=args.quantize, compile=args.compile)
    if engine.tokenizer is None:
        raise UserError(f"{args.checkpoint} has no tokenizer.json to encode the prompt with")
    if args.chat:  # the model's chat template; the turn ends at its eos ids (+ ChatML's <|im_end|>)
        try:
            prompt_ids = engine.encode_chat([{"role": "user", "content": args.prompt}])
        except ValueError as e:  # the template refused the message
            raise UserError(str(e)) from None
        stop_ids = list(engine.chat_stop_token_ids)
    else:  # with the BOS the tokenizer adds, as LLM.generate and the server do
        prompt_ids = encode_text(engine.tokenizer, args.prompt)
        stop_ids = []
    if not prompt_ids:
        raise UserError("the prompt is empty")
    max_tokens = args.max_new_tokens
    if max_tokens is None:
        max_tokens = default_max_tokens(len(prompt_ids), engine.max_model_len)
        if max_tokens < DEFAULT_MAX_NEW_TOKENS:
            print(f"note: generating at most {max_tokens} tokens, what the prompt ({len(prompt_ids)} tokens) leaves "
                  f"of the model's context ({engine.max_model_len}); --max_new_tokens sets the length",
                  file=sys.stderr, flush=True)
    params = build_params(args, max_tokens, stop_ids)
    try:
        engine.add_request(prompt_ids, params)
    except ValueError as e:
        raise UserError(str(e)) from None

    start = time.perf_counter()
    first_token_at = None
    text, token_ids, finish = [], [], None
    while engine.has_unfinished():
        for out in engine.step():
            if first_token_at is None:
                first_token_at = time.perf_counter()
            text.append(out.new_text)
            token_ids += out.new_token_ids
            if not args.json:
                sys.stdout.write(out.new_text)
                sys.stdout.flush()
            if out.finished:
                finish = out.finish_reason
    seconds = time.perf_counter() - start
    speed = len(token_ids) / seconds if seconds > 0 else 0.0
    if args.json:
        result = {
            "prompt": args.prompt, "text": "".join(text), "token_ids": token_ids, "finish_reason": finish,
            "prompt_tokens": len(prompt_ids), "completion_tokens": len(token_ids), "seconds": round(seconds, 4),
            "time_to_first_token_s": round((first_token_at or start) - start, 4),
            "tokens_per_second": round(speed, 2),
        }
        if engine.speculative is not None:
            result["speculative"] = {
                "num_speculative_tokens": engine.speculative.k,
                "proposed": engine.speculative.num_proposed,
                "accepted": engine.speculative.num_accepted,
                "acceptance_rate": round(engine.speculative.acceptance_rate, 4),
            }
        print(json.dumps(result))
    else:
        print(flush=True)
        note = "" if engine.speculative is None else f", {engine.speculative.acceptance_rate:.0%} drafts accepted"
        print(f"[{len(token_ids)} tokens, {speed:.1f} tok/s, {finish}{note}]", file=sys.stderr, flush=True)


if __name__ == "__main__":
    cli_main(main)
