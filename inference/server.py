"""OpenAI-compatible HTTP server (FastAPI + uvicorn) for a checkpoint, with a web chat page.

    python inference/server.py --checkpoint runs/.../step_00001000 [--host 127.0.0.1 --port 8000]
        [--api_key KEY] [--model_name NAME]

Serves `POST /v1/chat/completions` (streaming or not), `POST /v1/completions`,
`GET /v1/models`, `GET /health` and the chat page at `/`. All requests share one
continuous-batching `LLMEngine` (see `inference/serving/`). Use it from the official client:

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="KEY or anything")
    client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Hi"}])

The default bind is the loopback address: pass `--host 0.0.0.0` (and an `--api_key`) to
expose it. The key may also come from the environment variable LLM_API_KEY, which keeps it
out of the process list.
"""
from __future__ import annotations

import argparse
import os
import socket
from pathlib import Path

from utils.errors import UserError, cli_main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="checkpoint directory (config.json + model.safetensors)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api_key", default=os.environ.get("LLM_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1 routes (default: env LLM_API_KEY, else none)")
    p.add_argument("--model_name", default=None, help="model id clients use (default: the checkpoint dir name)")
    p.add_argument("--adapter", default=None, help="LoRA adapter directory to apply")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    p.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16")
    p.add_argument("--quantize", default=None, choices=["int8"],
                   help="weight-only int8 on the CPU (torch's packed kernel; about 1/4 of the fp32 weight bytes)")
    p.add_argument("--compile", action="store_true",
                   help="compile the decode step (torch.compile: one graph per batch-size / context bucket, built "
                        "on first use in seconds to a minute, then replayed; eager with a warning where it fails)")
    p.add_argument("--max_num_seqs", type=int, default=32, help="sequences decoded together at most")
    p.add_argument("--max_num_batched_tokens", type=int, default=2048, help="tokens per engine step at most")
    p.add_argument("--prefill_chunk_size", type=int, default=None,
                   help="while others decode, compute a new prompt this many tokens per step, in turns with "
                        "decode steps (chunked prefill: a long prompt never stalls the streams); default: whole prompts")
    p.add_argument("--kv_cache_memory_mb", type=int, default=None, help="KV cache size (default: from free memory)")
    p.add_argument("--log_level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    return p.parse_args(argv)


def check_bindable(host: str, port: int) -> None:
    """Fail fast (before loading the model) when the address cannot be listened on."""
    if not 0 < port < 65536:
        raise UserError(f"--port must be in 1..65535, got {port}")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise UserError(f"--host {host!r} is not an address this machine knows ({e.strerror})") from None
    family, kind, proto, _, addr = infos[0]
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(addr)
        except OSError as e:
            raise UserError(f"cannot listen on {host}:{port}: {e.strerror}") from None


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not Path(args.checkpoint).is_dir():  # fail before the slow imports
        raise UserError(f"checkpoint not found: {args.checkpoint}")
    if args.prefill_chunk_size is not None and args.prefill_chunk_size < 1:
        raise UserError(f"--prefill_chunk_size must be >= 1, got {args.prefill_chunk_size}")
    check_bindable(args.host, args.port)
    import uvicorn  # heavy imports after the argument checks

    from inference.engine.llm_engine import LLMEngine
    from inference.serving import create_app

    checkpoint = Path(args.checkpoint)
    model_name = args.model_name or checkpoint.resolve().name
    if args.compile:
        from inference.engine.compiled_decode import show_compile_progress

        show_compile_progress()
    engine = LLMEngine(checkpoint, adapter=args.adapter, device=args.device, dtype=args.dtype,
                       kv_cache_memory_mb=args.kv_cache_memory_mb, max_num_seqs=args.max_num_seqs,
                       max_num_batched_tokens=args.max_num_batched_tokens, quantize=args.quantize, compile=args.compile,
                       prefill_chunk_size=args.prefill_chunk_size)
    app = create_app(engine, model_name, api_key=args.api_key)
    print(f"serving {model_name!r} on http://{args.host}:{args.port}  (chat page at /, API at /v1)", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)


if __name__ == "__main__":
    cli_main(main)
