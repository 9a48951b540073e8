"""Step 3 of the data pipeline: encode the raw stories into one flat token bin.

Reads `<data_dir>/raw/tinystories.txt` (stories separated by lines `<|endoftext|>`, written by
download_tinystories.py) and the tokenizer in `<data_dir>/tokenizer/`, and writes
`<data_dir>/encoded/stories.{bin,idx,json}`: every story's tokens followed by EOS, the offset
of every story, and a sidecar naming the source and the tokenizer hash. Encoding runs in
batches through the `tokenizers` Rust batch encoder, which spreads each batch over all CPU
cores. Optional cleaning before encoding: `--dedup` (exact, then MinHash-LSH near-duplicate
removal, Broder 1997) and `--scrub_pii` (e-mail addresses, phone numbers, ... replaced).

    python data_pipeline/processing/encode_stories.py [--data_dir data] [--dedup] [--scrub_pii]
"""
from __future__ import annotations

import argparse
import time
from collections import Counter
from pathlib import Path
from typing import Iterable, Iterator

from data_pipeline.chat import ChatTokenizer
from data_pipeline.cleaning.dedup import exact_dedup, near_dedup
from data_pipeline.cleaning.documents import split_documents
from data_pipeline.cleaning.scrub_pii import scrub_pii
from data_pipeline.formats import COMMANDS, EOS_TOKEN, TokenBinWriter, bin_nbytes, file_sha256, token_dtype
from data_pipeline.processing.common import add_data_dir_arg, layout_from, load_tokenizer, progress, summary
from utils.errors import UserError, cli_main

BATCH_DOCS = 1024  # stories per call of the batch encoder
READ_CHARS = 1 << 24  # characters read from the raw file at a time


def read_stories(path: Path) -> Iterator[str]:
    """Stream the stories of a file in which `<|endoftext|>` ends each story, with exactly the
    semantics of `cleaning.documents.split_documents` (stripped, empty ones skipped), reading
    the file in chunks so a multi-GB corpus never sits in memory at once."""
    rest, seen_separator = "", False
    try:
        with open(path, encoding="utf-8") as f:
            for chunk in iter(lambda: f.read(READ_CHARS), ""):
                done, sep, rest = (rest + chunk).rpartition(EOS_TOKEN)
                seen_separator = seen_separator or bool(sep)
                yield from split_documents(done)
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text ({e.reason}): expected stories separated by lines "
                        f"'{EOS_TOKEN}'") from None
    if rest.strip() and not seen_separator:
        raise UserError(f"{path} has no '{EOS_TOKEN}' separator: expected stories separated by lines "
                        f"'{EOS_TOKEN}'")
    yield from split_documents(rest)


def _encode(stories: Iterable[str], ct: ChatTokenizer, writer: TokenBinWriter, total_bytes: int,
            scrub: bool) -> tuple[int, dict[str, int]]:
    """Encode stories in batches (Rust-parallel), each followed by EOS; returns (characters
    encoded, personal data replaced per kind)."""
    bar = progress(total_bytes, "encode", unit="B")
    n_chars, pii_counts, batch = 0, Counter(), []

    def flush() -> None:
        for ids in ct.encode_batch(batch):
            writer.add([ids + [ct.eos_id]])
        bar.update(sum(len(s.encode("utf-8")) for s in batch))
        batch.clear()

    for story in stories:
        if scrub:
            story, counts = scrub_pii(story)
            pii_counts.update(counts)
        n_chars += len(story)
        batch.append(story)
        if len(batch) == BATCH_DOCS:
            flush()
    if batch:
        flush()
    bar.close()
    return n_chars, dict(pii_counts)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_data_dir_arg(p)
    p.add_argument("--dedup", action="store_true", help="drop exact and near-duplicate stories first")
    p.add_argument("--dedup_threshold", type=float, default=0.8,
                   help="Jaccard similarity above which stories count as near-duplicates (with --dedup)")
    p.add_argument("--scrub_pii", action="store_true", help="replace personal data (e-mails, phones, ...) first")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    layout = layout_from(args)
    raw = layout.raw_stories
    if not raw.exists():
        raise UserError(f"{raw} not found: run `{COMMANDS['raw']}` first")
    if not 0.0 < args.dedup_threshold < 1.0:
        raise UserError(f"--dedup_threshold must be in (0, 1), got {args.dedup_threshold}")
    ct, tok_hash = load_tokenizer(layout)
    t0 = time.perf_counter()

    stories: Iterator[str] | list[str] = read_stories(raw)
    stats: dict[str, int] = {}
    if args.dedup:
        stories, stats["exact_duplicates_removed"] = exact_dedup(list(stories))
        stories, stats["near_duplicates_removed"] = near_dedup(stories, threshold=args.dedup_threshold)
    raw_side = layout.raw_stories_sidecar

    with TokenBinWriter(layout.encoded_stories, token_dtype(ct.vocab_size)) as writer:
        n_chars, pii_counts = _encode(stories, ct, writer, raw.stat().st_size, args.scrub_pii)
        if writer.num_items == 0:
            raise UserError(f"{raw} holds no stories (expected text with `{EOS_TOKEN}` lines between stories)")
        if args.scrub_pii:
            stats["pii_replaced"] = sum(pii_counts.values())
        sc = writer.close(
            kind="encoded", vocab_size=ct.vocab_size, tokenizer_hash=tok_hash, eos_id=ct.eos_id,
            pad_id=ct.pad_id, created_by=COMMANDS["encoded"],
            source={"path": str(raw.relative_to(layout.root)), "bytes": raw.stat().st_size,
                    "sidecar_sha256": file_sha256(raw_side) if raw_side.exists() else None,
                    "dedup": args.dedup, "dedup_threshold": args.dedup_threshold if args.dedup else None,
                    "scrub_pii": args.scrub_pii},
            stats={"chars": n_chars, **stats, **({"pii_by_kind": pii_counts} if args.scrub_pii else {})},
        )
    seconds = time.perf_counter() - t0
    notes = "".join(f"{k.replace('_', ' ')} {v:,}, " for k, v in stats.items())
    summary("encode_stories", sc.num_items, "stories", sc.num_tokens,
            bin_nbytes(layout.encoded_stories), seconds, f"{notes}-> {layout.encoded_stories}.bin")


if __name__ == "__main__":
    cli_main(main)
