"""Train the project's tokenizer on the raw TinyStories corpus and save a tokenizer directory.

    python data_pipeline/tokenizer/train_tokenizer.py --vocab_size 4096 --data_limit_mb 100 [--backend hf|bpe|sentencepiece]

Reads ``<data_dir>/raw/tinystories.txt`` (written by the download step; stories separated by
lines ``<|endoftext|>``), at most `--data_limit_mb` MB of it, and writes ``<data_dir>/tokenizer/``
(see `data_pipeline.tokenizer.io`): a ``tokenizer.json`` that `tokenizers` and
`transformers.AutoTokenizer` load, with the special tokens and the ChatML chat template.

Backends, all byte-level so no text is ever unknown:
  hf             HF `tokenizers` ByteLevel BPE trainer (Rust; the default)
  bpe            the hand-written byte-level BPE in `bpe.py` (same merges as hf)
  sentencepiece  sentencepiece BPE with byte_fallback, converted to tokenizer.json
Each story is one training text (the separator never reaches the trainer).
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from data_pipeline.formats import EOS_TOKEN, SPECIAL_TOKENS
from data_pipeline.tokenizer.bpe import train_bpe
from data_pipeline.tokenizer.io import (
    DEFAULT_MODEL_MAX_LENGTH, SPM_MODEL_FILE, TOKENIZER_FILE, load_tokenizer, tokenizer_hash, write_hf_configs,
    write_meta,
)
from utils.errors import UserError, cli_main
from utils.paths import resolve_path
from utils.progress import progress

BACKENDS = ("hf", "bpe", "sentencepiece")
MIN_VOCAB = 256 + len(SPECIAL_TOKENS)
MAX_VOCAB = 1 << 20
BYTES_PER_MB = 1_000_000
PARALLEL_MIN_CHARS = 20_000_000  # bpe backend: below this, worker start-up costs more than it saves


def read_stories(path: Path, limit_bytes: int) -> tuple[list[str], int]:
    """The stories in the first `limit_bytes` of `path`, and the number of bytes used.

    When the file is longer, the text ends at the last complete line within the limit
    (or, with no newline there, at the last whole UTF-8 character).
    """
    with open(path, "rb") as f:
        data = f.read(limit_bytes + 1)
    if len(data) > limit_bytes:
        newline = data.rfind(b"\n", 0, limit_bytes)
        cut = newline + 1 if newline >= 0 else limit_bytes
        while 0 < cut and (data[cut] & 0xC0) == 0x80:  # data[cut] continues a character: back up
            cut -= 1
        data = data[:cut]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    stories = [s.strip("\n") for s in text.split(EOS_TOKEN)]
    return [s for s in stories if s.strip()], len(data)


def train_hf(stories: list[str], vocab_size: int) -> Tokenizer:
    """HF's ByteLevel BPE: the reference the hand-written `bpe.py` matches merge for merge."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=0, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,  # its bars print to stdout
    )
    # The trainer pulls stories as it pre-tokenizes them, the bulk of its work: that is the bar.
    tok.train_from_iterator(progress(stories, desc="hf bpe: reading stories", unit="story"), trainer,
                            length=len(stories))
    return tok


def train_to_dir(backend: str, stories: list[str], vocab_size: int, out_dir: Path) -> None:
    """Train with `backend` and write ``tokenizer.json`` (+ ``tokenizer.model``) into `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / (TOKENIZER_FILE + ".tmp")
    spm_file = out_dir / SPM_MODEL_FILE
    if backend == "hf":
        train_hf(stories, vocab_size).save(str(tmp))
    elif backend == "bpe":
        workers = min(4, os.cpu_count() or 1) if sum(map(len, stories)) >= PARALLEL_MIN_CHARS else 1
        train_bpe(stories, vocab_size, SPECIAL_TOKENS, num_workers=workers,
                  show_progress=True).save(tmp)
    else:
        # imported here: only this backend needs sentencepiece
        from data_pipeline.tokenizer.sentencepiece_backend import sentencepiece_to_hf, train_sentencepiece

        lines = [line for s in stories for line in s.split("\n") if line.strip()]
        try:
            proto = train_sentencepiece(progress(lines, desc="sentencepiece: reading lines", unit="line"),
                                        vocab_size, SPECIAL_TOKENS)
        except RuntimeError as e:
            raise UserError(f"sentencepiece could not train with --vocab_size {vocab_size}: {e}") from None
        sentencepiece_to_hf(proto, SPECIAL_TOKENS).save(str(tmp))
        spm_file.with_name(SPM_MODEL_FILE + ".tmp").write_bytes(proto)
        os.replace(spm_file.with_name(SPM_MODEL_FILE + ".tmp"), spm_file)
    os.replace(tmp, out_dir / TOKENIZER_FILE)
    if backend != "sentencepiece" and spm_file.exists():  # left over from an earlier sentencepiece run
        spm_file.unlink()


def count_tokens(tok: Tokenizer, stories: list[str], batch: int = 1024) -> int:
    """Tokens of the corpus as the saved tokenizer encodes it (one EOS per story included)."""
    total = 0
    for i in progress(range(0, len(stories), batch), desc="counting tokens", unit="batch"):
        total += sum(len(e.ids) + 1 for e in tok.encode_batch(stories[i : i + batch]))
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab_size", type=int, default=4096, help="tokens in the vocabulary, special tokens included")
    ap.add_argument("--data_limit_mb", type=float, default=100.0, help="read at most this many MB (10^6 bytes) of the corpus")
    ap.add_argument("--backend", choices=BACKENDS, default="hf")
    ap.add_argument("--data_dir", default="data", help="data directory (relative paths: from the repo root)")
    ap.add_argument("--input", default=None, help="corpus file instead of <data_dir>/raw/tinystories.txt")
    ap.add_argument("--model_max_length", type=int, default=DEFAULT_MODEL_MAX_LENGTH,
                    help="model_max_length written to tokenizer_config.json")
    args = ap.parse_args()

    if args.vocab_size < MIN_VOCAB:
        raise UserError(f"--vocab_size {args.vocab_size} is too small: need at least {MIN_VOCAB} "
                        f"(256 bytes + {len(SPECIAL_TOKENS)} special tokens)")
    if args.vocab_size > MAX_VOCAB:
        raise UserError(f"--vocab_size {args.vocab_size} is too large: at most {MAX_VOCAB}")
    if args.data_limit_mb <= 0:
        raise UserError(f"--data_limit_mb must be > 0, got {args.data_limit_mb}")
    if args.model_max_length < 1:
        raise UserError(f"--model_max_length must be >= 1, got {args.model_max_length}")
    data_dir = resolve_path(args.data_dir)
    if args.input is not None:
        source = resolve_path(args.input)
        if not source.is_file():
            raise UserError(f"--input {source} not found")
    else:
        source = data_dir / "raw" / "tinystories.txt"
        if not source.is_file():
            raise UserError(f"{source} not found; run python data_pipeline/download/download_tinystories.py first")

    t0 = time.perf_counter()
    stories, bytes_used = read_stories(source, int(args.data_limit_mb * BYTES_PER_MB))
    if not stories:
        raise UserError(f"{source} holds no text to train on")
    out_dir = data_dir / "tokenizer"
    train_to_dir(args.backend, stories, args.vocab_size, out_dir)
    train_seconds = time.perf_counter() - t0
    write_hf_configs(out_dir, args.model_max_length)
    loaded = load_tokenizer(out_dir)
    n_tokens = count_tokens(loaded.tokenizer, stories)
    seconds = time.perf_counter() - t0
    vocab = loaded.tokenizer.get_vocab_size()
    write_meta(out_dir, {
        "backend": args.backend,
        "vocab_size": vocab,
        "requested_vocab_size": args.vocab_size,
        "special_tokens": loaded.special_ids,
        "source": str(source),
        "source_bytes": source.stat().st_size,
        "bytes_used": bytes_used,
        "stories": len(stories),
        "tokens": n_tokens,
        "train_seconds": round(train_seconds, 3),
        "seconds": round(seconds, 3),  # reading + training + counting tokens
        "tokenizer_hash": tokenizer_hash(out_dir),
    })
    print(f"tokenizer ({args.backend}, vocab {vocab}): {len(stories)} stories, {n_tokens} tokens, "
          f"{bytes_used} bytes, {seconds:.1f}s -> {out_dir}")


if __name__ == "__main__":
    cli_main(main)
