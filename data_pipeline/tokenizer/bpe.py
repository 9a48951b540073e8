"""A hand-written byte-level BPE tokenizer: training, encode/decode, HF `tokenizer.json` I/O.

Byte-pair encoding (Sennrich et al. 2016, "Neural Machine Translation of Rare Words with
Subword Units") over bytes, as in GPT-2 (Radford et al. 2019): text is pre-tokenized by
GPT-2's regex, each word is a sequence of byte tokens, and training repeatedly merges the
most frequent adjacent pair of tokens into a new token.

Parity with Hugging Face `tokenizers` (the reference): trained on the same texts, `train_bpe`
learns the same merges, in the same order, with the same token ids, as

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=V, min_frequency=m, special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))

and `save` writes the same `tokenizer.json`. The rules that make this exact:
  * ids: special tokens first, then the 256 byte characters sorted by code point, then one
    id per merge in merge order;
  * a pair's count is its number of adjacent occurrences weighted by word frequency,
    overlapping ones included (``aaa`` holds ``(a, a)`` twice), while a merge rewrites
    the word left to right without overlap;
  * tie-break: the highest count wins; among equal counts the pair with the smallest
    ``(left id, right id)`` wins. HF's trainer keeps a max-heap whose `Ord` compares the
    count, then ``other.pair.cmp(&self.pair)``, i.e. ascending pairs; stale heap entries
    are re-pushed with their current count when popped (lazy invalidation, as here);
  * training stops at `vocab_size` tokens or when the best count is below
    ``max(1, min_frequency)``.
One known difference, in a corner case: when a merge spells a token string that already
exists (two different merges giving the same string), HF reuses the id and keeps a
separate occurrence list for the pairs it forms, so it may merge those in later, separate
steps (and list a merge twice); we merge all occurrences of a pair at once. It does not
occur on the TinyStories text nor in the randomized comparison in tests/test_bpe.py.

Encoding follows HF's `BPE` model: inside a word, repeatedly merge the adjacent pair with
the lowest merge rank, the leftmost one among equals. Special tokens are cut out of the
text before pre-tokenization, so they are never split.
"""
from __future__ import annotations

import heapq
import json
from collections import defaultdict
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import regex

from data_pipeline.tokenizer.byte_level import (
    BYTE_TO_CHAR, CHAR_TO_BYTE, count_words, from_byte_level, split_words, to_byte_level,
)
from utils.progress import progress

_MAX_CACHE = 200_000  # encode() memoizes words; the cache is cleared when it grows past this


def train_bpe(
    texts: Iterable[str],
    vocab_size: int,
    special_tokens: Sequence[str] = (),
    min_frequency: int = 0,
    num_workers: int = 1,
    show_progress: bool = False,
) -> "BPETokenizer":
    """Learn a byte-level BPE from `texts` (each text pre-tokenized on its own)."""
    word_counts = count_words(texts, num_workers=num_workers, show_progress=show_progress)
    return train_bpe_from_counts(word_counts, vocab_size, special_tokens, min_frequency, show_progress)


def train_bpe_from_counts(
    word_counts: Mapping[str, int],
    vocab_size: int,
    special_tokens: Sequence[str] = (),
    min_frequency: int = 0,
    show_progress: bool = False,
) -> "BPETokenizer":
    """Learn merges from pre-token counts ``{" the": 1234, ...}`` (raw text words).

    Every word is held as a string with one character per token, ``chr(token_id)``, so a
    merge is one C-level `str.replace` and a pair is a 2-character string whose ordering
    is the ordering of ``(left id, right id)``: the heap breaks ties exactly like HF.
    """
    if vocab_size > 0x110000:
        raise ValueError(f"vocab_size {vocab_size} is larger than this trainer supports (1114112)")
    tokens: list[str] = []  # id → byte-level token string
    token_id: dict[str, int] = {}
    for tok in [*special_tokens, *sorted(BYTE_TO_CHAR.values())]:
        if tok not in token_id:
            token_id[tok] = len(tokens)
            tokens.append(tok)

    to_id_chars = {ord(c): chr(token_id[c]) for c in BYTE_TO_CHAR.values()}  # byte char → its id's char
    words = [to_byte_level(w).translate(to_id_chars) for w in word_counts]
    freqs = list(word_counts.values())

    counts: defaultdict[str, int] = defaultdict(int)  # pair → weighted count
    where: defaultdict[str, set[int]] = defaultdict(set)  # pair → ids of words that (may) hold it
    for i, (word, freq) in enumerate(zip(words, freqs)):
        for j in range(len(word) - 1):
            pair = word[j : j + 2]
            counts[pair] += freq
            where[pair].add(i)
    heap = [(-c, pair) for pair, c in counts.items()]  # max-count first, then smallest pair
    heapq.heapify(heap)

    merges: list[tuple[int, int]] = []
    threshold = max(1, min_frequency)
    with progress(total=max(0, vocab_size - len(tokens)), desc="bpe merges", enabled=show_progress) as bar:
        while len(tokens) < vocab_size and heap:
            neg_count, pair = heapq.heappop(heap)
            count = counts.get(pair, 0)
            if count != -neg_count:  # stale entry (its count dropped): requeue with the true count
                if count > 0:
                    heapq.heappush(heap, (-count, pair))
                continue
            if count < threshold:
                break
            left, right = ord(pair[0]), ord(pair[1])
            new_token = tokens[left] + tokens[right]
            new_id = token_id.get(new_token)
            if new_id is None:
                new_id = token_id[new_token] = len(tokens)
                tokens.append(new_token)
                bar.update(1)
            merges.append((left, right))
            new_pairs = _merge_words(pair, chr(new_id), where.pop(pair), words, freqs, counts, where)
            del counts[pair]
            for q in new_pairs:
                heapq.heappush(heap, (-counts[q], q))

    specials = {t: token_id[t] for t in special_tokens}
    return BPETokenizer(token_id, [(tokens[a], tokens[b]) for a, b in merges], specials)


def _merge_words(
    pair: str,
    new_char: str,
    word_ids: set[int],
    words: list[str],
    freqs: list[int],
    counts: defaultdict[str, int],
    where: defaultdict[str, set[int]],
) -> set[str]:
    """Merge `pair` into `new_char` in the given words, updating pair counts in place.

    Only the words that hold the pair are touched (no recount). Returns the pairs that
    contain the new token: they are new and must be pushed on the heap.
    """
    new_pairs: set[str] = set()
    for i in word_ids:
        old = words[i]
        if pair not in old:  # the word lost this pair to an earlier merge
            continue
        new = old.replace(pair, new_char)  # left to right, non-overlapping, like HF
        words[i] = new
        freq = freqs[i]
        for j in range(len(old) - 1):
            counts[old[j : j + 2]] -= freq
        for j in range(len(new) - 1):
            q = new[j : j + 2]
            counts[q] += freq
            if new_char in q:
                where[q].add(i)
                new_pairs.add(q)
    return new_pairs


class BPETokenizer:
    """Byte-level BPE encoder/decoder with special tokens; reads/writes HF `tokenizer.json`.

    vocab: byte-level token string → id (special tokens included, spelled as themselves);
    merges: pairs of token strings in rank order; special_tokens: content → id.
    """

    def __init__(self, vocab: Mapping[str, int], merges: Sequence[tuple[str, str]], special_tokens: Mapping[str, int]):
        self.vocab = dict(vocab)
        self.merges = [tuple(m) for m in merges]
        self.special_tokens = dict(special_tokens)
        size = max([*self.vocab.values(), *self.special_tokens.values()]) + 1
        self._id_to_token: list[str] = [""] * size
        for tok, i in self.vocab.items():
            self._id_to_token[i] = tok
        self._id_bytes: list[bytes] = [b""] * size
        for tok, i in self.vocab.items():
            if tok not in self.special_tokens:
                if not all(c in CHAR_TO_BYTE for c in tok):
                    raise ValueError(f"vocab token {tok!r} is neither byte-level nor a special token")
                self._id_bytes[i] = from_byte_level(tok)
        for tok, i in self.special_tokens.items():
            self._id_to_token[i] = tok
            self._id_bytes[i] = tok.encode("utf-8")
        self._byte_id = {b: self.vocab[c] for b, c in BYTE_TO_CHAR.items() if c in self.vocab}
        if len(self._byte_id) < 256:
            raise ValueError("vocab lacks some of the 256 byte-level base tokens")
        # (left id, right id) → (rank, merged id); a later duplicate overwrites, as in HF.
        self._ranks: dict[tuple[int, int], tuple[int, int]] = {}
        for rank, (a, b) in enumerate(self.merges):
            if a not in self.vocab or b not in self.vocab or a + b not in self.vocab:
                raise ValueError(f"merge {a!r} + {b!r} uses a token missing from the vocab")
            self._ranks[self.vocab[a], self.vocab[b]] = (rank, self.vocab[a + b])
        by_length = sorted(self.special_tokens, key=len, reverse=True)
        self._special_re = regex.compile("(" + "|".join(map(regex.escape, by_length)) + ")") if by_length else None
        self._cache: dict[str, list[int]] = {}

    @property
    def vocab_size(self) -> int:
        return len(self._id_to_token)

    def token_to_id(self, token: str) -> int | None:
        return self.special_tokens.get(token, self.vocab.get(token))

    def id_to_token(self, i: int) -> str:
        return self._id_to_token[i]

    # ------------------------------------------------------------------ encode / decode
    def encode(self, text: str) -> list[int]:
        """Text → token ids; special tokens in the text become their single ids."""
        if self._special_re is None:
            return self.encode_ordinary(text)
        ids: list[int] = []
        for k, piece in enumerate(self._special_re.split(text)):
            if k % 2:  # odd pieces are the captured special tokens
                ids.append(self.special_tokens[piece])
            elif piece:
                ids.extend(self.encode_ordinary(piece))
        return ids

    def encode_ordinary(self, text: str) -> list[int]:
        """Text → token ids, treating special-token text as plain text."""
        ids: list[int] = []
        cache = self._cache
        for word in split_words(text):
            word_ids = cache.get(word)
            if word_ids is None:
                if len(cache) >= _MAX_CACHE:
                    cache.clear()
                word_ids = cache[word] = self._bpe([self._byte_id[b] for b in word.encode("utf-8")])
            ids.extend(word_ids)
        return ids

    def _bpe(self, ids: list[int]) -> list[int]:
        """Merge one word's byte ids: lowest rank first, leftmost among equal ranks (HF's order)."""
        n = len(ids)
        if n < 2:
            return ids
        nxt = list(range(1, n + 1))  # linked list over positions; n means "end"
        prv = list(range(-1, n - 1))
        alive = [True] * n
        ranks = self._ranks
        heap = []
        for i in range(n - 1):
            m = ranks.get((ids[i], ids[i + 1]))
            if m is not None:
                heap.append((m[0], i, m[1]))
        heapq.heapify(heap)
        while heap:
            rank, i, new_id = heapq.heappop(heap)
            j = nxt[i]
            if not alive[i] or j == n:
                continue
            m = ranks.get((ids[i], ids[j]))
            if m is None or m[1] != new_id:  # this pair changed since it was queued
                continue
            ids[i] = new_id  # merge j into i
            alive[j] = False
            nxt[i] = nxt[j]
            if nxt[j] < n:
                prv[nxt[j]] = i
            if prv[i] >= 0:
                m = ranks.get((ids[prv[i]], new_id))
                if m is not None:
                    heapq.heappush(heap, (m[0], prv[i], m[1]))
            if nxt[i] < n:
                m = ranks.get((new_id, ids[nxt[i]]))
                if m is not None:
                    heapq.heappush(heap, (m[0], i, m[1]))
        return [ids[i] for i in range(n) if alive[i]]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Token ids → text (invalid UTF-8, e.g. a cut multi-byte character, becomes U+FFFD)."""
        skip = set(self.special_tokens.values()) if skip_special_tokens else ()
        return b"".join(self._id_bytes[i] for i in ids if i not in skip).decode("utf-8", errors="replace")

    # ------------------------------------------------------------------ tokenizer.json
    def to_hf_dict(self) -> dict:
        """The HF `tokenizers` JSON document (same keys and order as `Tokenizer.to_str()`)."""
        byte_level = {"add_prefix_space": False, "trim_offsets": True, "use_regex": True}
        added = [
            {"id": i, "content": tok, "single_word": False, "lstrip": False, "rstrip": False,
             "normalized": False, "special": True}
            for tok, i in sorted(self.special_tokens.items(), key=lambda kv: kv[1])
        ]
        return {
            "version": "1.0",
            "truncation": None,
            "padding": None,
            "added_tokens": added,
            "normalizer": None,
            "pre_tokenizer": {"type": "ByteLevel", **byte_level},
            "post_processor": None,
            "decoder": {"type": "ByteLevel", **byte_level, "add_prefix_space": True},
            "model": {
                "type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                "vocab": dict(sorted(self.vocab.items(), key=lambda kv: kv[1])),
                "merges": [list(m) for m in self.merges],
            },
        }

    def save(self, path: str | Path) -> None:
        """Write `tokenizer.json` (pretty-printed like HF's `Tokenizer.save`)."""
        Path(path).write_text(json.dumps(self.to_hf_dict(), indent=2, ensure_ascii=False), encoding="utf-8")

    @classmethod
    def from_file(cls, path: str | Path) -> "BPETokenizer":
        """Read a byte-level BPE `tokenizer.json` (ours or HF's with the same pipeline)."""
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
        model = doc.get("model") or {}
        pre = doc.get("pre_tokenizer") or {}
        if model.get("type") != "BPE" or pre.get("type") != "ByteLevel" or doc.get("normalizer") is not None:
            raise ValueError(f"{path}: not a byte-level BPE tokenizer.json (model BPE + ByteLevel pre-tokenizer)")
        if pre.get("add_prefix_space") or not pre.get("use_regex", True):
            raise ValueError(f"{path}: only ByteLevel(add_prefix_space=False, use_regex=True) is supported")
        merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]
        added = doc.get("added_tokens", [])
        if not all(t.get("special") for t in added):
            raise ValueError(f"{path}: non-special added tokens are not supported")
        specials = {t["content"]: t["id"] for t in added}
        return cls(model["vocab"], merges, specials)

