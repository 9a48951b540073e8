"""Tokenizer training speed: the hand-written byte-level BPE vs HF `tokenizers` (Rust), side by side.

    python benchmarks/tokenizer_speed.py [--vocab_size 4096] [--repeats 3] [--num_workers 1]

Both train on the shared TinyStories text (TinyStories V2 first 10k lines + V1 first 2 MiB,
each story one text, ~3.5 MB) with the same settings (see `data_pipeline/tokenizer/bpe.py`).
Prints one JSON object: best-of-`repeats` seconds of each, our time split into
pre-tokenization counting and merging, the ratio ours/HF, and whether the learned
merges are identical.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from data_pipeline.formats import EOS_TOKEN, SPECIAL_TOKENS
from data_pipeline.tokenizer.bpe import train_bpe_from_counts
from data_pipeline.tokenizer.byte_level import count_words
from utils.errors import UserError, cli_main
from utils.paths import shared_data_dir

FILES = ("tinystoriesV2_train_first10k_lines.txt", "tinystories_v1_train_first2MiB.txt")


def shared_stories() -> list[str]:
    """The shared TinyStories training text, one string per story."""
    root = shared_data_dir()
    paths = [root / "tinystories" / f for f in FILES] if root is not None else []
    if not paths or not all(p.is_file() for p in paths):
        raise UserError("shared TinyStories text not found (set LLM_DATA_DIR or place it at ../shared/data)")
    stories = [s.strip("\n") for p in paths for s in Path(p).read_text(encoding="utf-8").split(EOS_TOKEN)]
    return [s for s in stories if s.strip()]


def train_hf(stories: list[str], vocab_size: int) -> tuple[Tokenizer, float]:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=0, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    t0 = time.perf_counter()
    tok.train_from_iterator(stories, trainer)
    return tok, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab_size", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=3, help="runs of each; the fastest counts")
    ap.add_argument("--num_workers", type=int, default=1, help="processes for our pre-tokenization counting")
    args = ap.parse_args()
    if args.repeats < 1:
        raise UserError(f"--repeats must be >= 1, got {args.repeats}")
    stories = shared_stories()

    hf_best, count_best, merge_best, ours_best = float("inf"), float("inf"), float("inf"), float("inf")
    for _ in range(args.repeats):
        hf_tok, hf_s = train_hf(stories, args.vocab_size)
        t0 = time.perf_counter()
        counts = count_words(stories, num_workers=args.num_workers)
        t1 = time.perf_counter()
        ours = train_bpe_from_counts(counts, args.vocab_size, SPECIAL_TOKENS)
        t2 = time.perf_counter()
        hf_best = min(hf_best, hf_s)
        count_best, merge_best, ours_best = min(count_best, t1 - t0), min(merge_best, t2 - t1), min(ours_best, t2 - t0)

    hf_merges = [tuple(m) for m in json.loads(hf_tok.to_str())["model"]["merges"]]
    print(json.dumps({
        "corpus_bytes": sum(len(s.encode("utf-8")) for s in stories),
        "stories": len(stories),
        "distinct_words": len(counts),
        "vocab_size": args.vocab_size,
        "merges": len(ours.merges),
        "repeats": args.repeats,
        "num_workers": args.num_workers,
        "hf_seconds": round(hf_best, 3),
        "ours_seconds": round(ours_best, 3),
        "ours_count_seconds": round(count_best, 3),
        "ours_merge_seconds": round(merge_best, 3),
        "ratio_ours_over_hf": round(ours_best / hf_best, 2),
        "merges_identical": hf_merges == ours.merges,
    }, indent=2))


if __name__ == "__main__":
    cli_main(main)
