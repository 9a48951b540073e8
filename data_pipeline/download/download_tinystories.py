"""Step 1 of the data pipeline: get story text into `<data_dir>/raw/tinystories.txt`.

Sources: the TinyStories dataset (Eldan & Li 2023) streamed from the Hugging Face hub
(`roneneldan/TinyStories`), a local file (stories separated by lines `<|endoftext|>`, or JSON
Lines with a text field), or the built-in story generator. Offline, the hub source falls
back to the built-in corpus with a WARNING (or exits 2 under --no_fallback). Writes the
stories separated by lines `<|endoftext|>` and a JSON sidecar saying where they came from.

    python data_pipeline/download/download_tinystories.py [--source hub|local|builtin] [--max_stories N]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Optional


from data_pipeline.builtin import generate_story
from data_pipeline.cleaning.documents import read_documents, split_documents, write_documents
from data_pipeline.download.sources import (
    add_source_args,
    check_source_args,
    created_now,
    fallback,
    field,
    is_jsonl,
    probe_hub,
    read_jsonl,
    stream_hub,
)
from data_pipeline.formats import DataLayout, write_json_atomic
from utils.errors import UserError, cli_main
from utils.paths import resolve_path
from utils.progress import progress

DATASET = "roneneldan/TinyStories"
DEFAULT_MAX = {"hub": 20_000, "builtin": 2_000}  # builtin: ~1.6 MB, generated in about a second
VALIDATION_START = 10**9  # the built-in validation split is the seed's stream from this index on


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_source_args(p, "TinyStories")
    p.add_argument("--max_stories", type=int, default=None,
                   help="stories to keep (default: 20000 from the hub, 2000 built-in, all of a local file)")
    p.add_argument("--split", choices=("train", "validation"), default="train", help="dataset split")
    p.add_argument("--text_field", default="text", help="field holding the story in a JSON Lines --input")
    return p.parse_args(argv)


def hub_stories(split: str, limit: int, timeout: float) -> list[str]:
    stories = []
    for row in stream_hub(DATASET, None, split, limit, timeout, desc=f"{DATASET} {split}"):
        stories.extend(split_documents(row["text"]))
    return stories[:limit]


def local_stories(path: Path, text_field: str) -> list[str]:
    """Stories of a `<|endoftext|>`-separated text file or of a JSON Lines file."""
    if not is_jsonl(path):
        return read_documents(path)
    stories = []
    for i, rec in enumerate(read_jsonl(path), 1):
        stories.extend(split_documents(field(rec, text_field, f"record {i} of {path}",
                                             hint="; choose the story field with --text_field")))
    if not stories:
        raise UserError(f"{path}: every {text_field!r} field is empty")
    return stories


def builtin_stories(split: str, n: int, seed: int) -> list[str]:
    start = 0 if split == "train" else VALIDATION_START
    return [generate_story(seed, start + i).text
            for i in progress(range(n), desc="built-in stories", unit=" stories", leave=False)]


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.max_stories is not None and args.max_stories < 1:
        raise UserError(f"--max_stories must be >= 1, got {args.max_stories}")
    check_source_args(args, "stories separated by <|endoftext|> lines, or JSONL")
    layout = DataLayout(resolve_path(args.data_dir))
    t0 = time.perf_counter()
    source, reason = args.source, None
    info: dict[str, Optional[str]] = {}
    if source == "hub":
        limit = args.max_stories or DEFAULT_MAX["hub"]
        reason = probe_hub(DATASET, args.timeout)
        if reason is None:
            try:
                stories = hub_stories(args.split, limit, args.timeout)
                info = {"dataset": DATASET, "split": args.split}
            except Exception as e:  # `datasets` raises many kinds (connection, auth, missing split)
                reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no details'}"
        if reason is not None:
            fallback(reason, args.no_fallback, DATASET)
            source = "builtin"
    if source == "local":
        path = resolve_path(args.input)
        stories = local_stories(path, args.text_field)[: args.max_stories]
        info = {"input": str(path), "text_field": args.text_field if is_jsonl(path) else None}
    if source == "builtin":
        stories = builtin_stories(args.split, args.max_stories or DEFAULT_MAX["builtin"], args.seed)
        info = {"generator": "data_pipeline.builtin", "split": args.split}

    n_bytes = write_documents(layout.raw_stories, stories)
    words = sum(len(s.split()) for s in stories)
    seconds = time.perf_counter() - t0
    write_json_atomic(layout.raw_stories_sidecar, {
        "source": source, "requested_source": args.source, "fallback_reason": reason, **info,
        "num_stories": len(stories), "words": words, "bytes": n_bytes, "seconds": round(seconds, 3),
        "seed": args.seed, "created": created_now(),
    })
    print(f"download_tinystories: {len(stories):,} stories, ~{words:,} words (~tokens), {n_bytes:,} bytes "
          f"in {seconds:.1f} s; source {source} -> {layout.raw_stories}", flush=True)


if __name__ == "__main__":
    cli_main(main)
