"""Byte-level pre-tokenization, as in GPT-2 (Radford et al. 2019) and HF `tokenizers`' ByteLevel.

Text is cut into "words" by GPT-2's regex (contractions, letter runs, number runs, runs of
other symbols, each with at most one leading space; whitespace runs), then every word's
UTF-8 bytes are written as printable characters through GPT-2's byte→unicode table, so
a BPE over these characters can spell any string and never needs an unknown token.

This is exactly what `tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False,
use_regex=True)` does. One known difference: HF's regex engine (Oniguruma) knows the
letter/number classes of Unicode 14, the `regex` package those of a newer Unicode, so code
points assigned after Unicode 14 may be split differently (they still round-trip).
"""
from __future__ import annotations

import multiprocessing
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from typing import Iterable

import regex

from utils.progress import progress

GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
WORD_RE = regex.compile(GPT2_PATTERN)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's table byte → printable character.

    Printable Latin-1 bytes (``!``..``~``, ``¡``..``¬``, ``®``..``ÿ``) stand for themselves;
    the other 68 bytes (controls, space, ...) take the characters U+0100, U+0101, ... in
    byte order, e.g. space (0x20) → ``Ġ`` (U+0120), newline (0x0A) → ``Ċ`` (U+010A).
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    n = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + n)
            n += 1
    return table


BYTE_TO_CHAR: dict[int, str] = bytes_to_unicode()
CHAR_TO_BYTE: dict[str, int] = {c: b for b, c in BYTE_TO_CHAR.items()}


def to_byte_level(text: str) -> str:
    """``"hi there"`` → ``"hiĠthere"``: the UTF-8 bytes of `text` as byte-level characters."""
    # Latin-1 turns each byte into the character with that code, which translate() maps.
    return text.encode("utf-8").decode("latin-1").translate(BYTE_TO_CHAR)


def from_byte_level(chars: str) -> bytes:
    """Inverse of `to_byte_level` (raises KeyError on a character outside the table)."""
    return bytes(CHAR_TO_BYTE[c] for c in chars)


def split_words(text: str) -> list[str]:
    """GPT-2 pre-tokenization: ``"Hi, you"`` → ``["Hi", ",", " you"]`` (no byte mapping)."""
    return WORD_RE.findall(text)


def _count_chunk(texts: Iterable[str]) -> Counter[str]:
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(WORD_RE.findall(text))
    return counts


def count_words(texts: Iterable[str], num_workers: int = 1, show_progress: bool = False) -> Counter[str]:
    """How often each pre-token occurs over all `texts` (each text is split on its own).

    Keys are the raw words (not byte-mapped): only the few distinct words need mapping
    later. With ``num_workers > 1`` the texts are cut into shards that worker processes
    count (started with "spawn": safe in a process that already runs threads, but about a
    second to start, so worth it only for corpora of several MB); the counts are added here.
    """
    texts = list(texts)
    if num_workers <= 1 or len(texts) < 2 * num_workers:
        return _count_chunk(progress(texts, desc="counting words", unit="text", enabled=show_progress))
    n_shards = 8 * num_workers  # several shards per worker: even load, a moving progress bar
    size = -(-len(texts) // n_shards)
    shards = [texts[i : i + size] for i in range(0, len(texts), size)]
    total: Counter[str] = Counter()
    with ProcessPoolExecutor(max_workers=num_workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        for counts in progress(pool.map(_count_chunk, shards), total=len(shards), desc="counting words",
                               unit="shard", enabled=show_progress):
            total.update(counts)
    return total
