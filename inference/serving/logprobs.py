"""Token log-probabilities in the OpenAI API's shapes, with each token's raw bytes.

OpenAI reports every token with its UTF-8 ``bytes``: a byte-level token may hold only part of a
character (an emoji is often 3 + 1 bytes), and a client rebuilds the text by joining the bytes.
Decoding such a token alone gives "\\ufffd", so the bytes are read from the vocabulary instead:
byte-level BPE pieces (GPT-2 / Llama 3 / Qwen) through the inverse of GPT-2's byte-to-character
table, SentencePiece pieces (Llama 2 / Mistral / Gemma) with "▁" as a space and ``<0xNN>``
byte-fallback pieces as that byte, added tokens as their text. A token's ``token`` string is
its bytes decoded, with the bytes of an incomplete character written as ``\\xNN`` escapes, so
distinct tokens keep distinct strings (the keys of ``/v1/completions``' ``top_logprobs``).
"""
from __future__ import annotations

import json
import re
from functools import lru_cache
from typing import Any

from tokenizers import Tokenizer

from inference.serving.protocol import CompletionLogprobs, TokenLogprob, TopLogprob

_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@lru_cache(maxsize=1)
def byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet inverted: the character standing for each byte -> the byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, n = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(printable, chars)}


def _decoder_types(tok: Tokenizer) -> set[str]:
    """The ``type`` of the tokenizer's decoder and of every decoder inside it (a Sequence)."""
    if tok.decoder is None:
        return set()
    found: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("type"), str):
                found.add(node["type"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(json.loads(tok.decoder.__getstate__()))
    return found


class TokenBytes:
    """Raw bytes and display strings of one tokenizer's token ids (cached per id)."""

    def __init__(self, tok: Tokenizer) -> None:
        self.tok = tok
        types = _decoder_types(tok)
        self.byte_level = "ByteLevel" in types
        self.sentencepiece = bool(types & {"Metaspace", "Replace", "ByteFallback"})
        self.added = set(tok.get_added_tokens_decoder())
        self._cache: dict[int, bytes] = {}

    def bytes(self, token_id: int) -> bytes:
        """The token's own bytes (a part of a UTF-8 character for some byte-level tokens)."""
        if token_id not in self._cache:
            self._cache[token_id] = self._bytes(token_id)
        return self._cache[token_id]

    def _bytes(self, token_id: int) -> bytes:
        piece = self.tok.id_to_token(token_id)
        if piece is None:
            return b""
        if token_id in self.added:
            return piece.encode("utf-8")
        table = byte_decoder()
        if self.byte_level and all(c in table for c in piece):
            return bytes(table[c] for c in piece)
        if self.sentencepiece:
            match = _BYTE_FALLBACK.fullmatch(piece)
            return bytes([int(match.group(1), 16)]) if match else piece.replace("▁", " ").encode("utf-8")
        return self.tok.decode([token_id], skip_special_tokens=False).encode("utf-8")

    def text(self, token_id: int) -> str:
        """The token as a string: its bytes decoded, an incomplete character's bytes as ``\\xNN``."""
        return self.bytes(token_id).decode("utf-8", errors="backslashreplace")


def _entries(out: Any) -> list[tuple[int, float, list[tuple[int, float]]]]:
    """(token id, logprob, [(alt id, alt logprob), ...]) for each new token of a StepOutput."""
    return [(tid, lp, list(top or [])) for tid, lp, top in out.logprobs]


def chat_logprobs(tokens: TokenBytes, out: Any) -> list[TokenLogprob]:
    """`/v1/chat/completions` logprobs of a StepOutput's new tokens."""
    def top(tid: int, lp: float) -> TopLogprob:
        return TopLogprob(token=tokens.text(tid), logprob=lp, bytes=list(tokens.bytes(tid)))

    return [TokenLogprob(**top(tid, lp).model_dump(), top_logprobs=[top(a, b) for a, b in alts])
            for tid, lp, alts in _entries(out)]


def completion_logprobs(tokens: TokenBytes, out: Any, offset: int) -> CompletionLogprobs:
    """The legacy `/v1/completions` logprobs object of a StepOutput's new tokens; `text_offset`
    counts characters from the completion's start (``offset``: where this step's text begins; an
    incomplete character counts once it is whole)."""
    lp = CompletionLogprobs(top_logprobs=[])
    pending = b""
    for tid, logprob, alts in _entries(out):
        lp.tokens.append(tokens.text(tid))
        lp.token_logprobs.append(logprob)
        lp.top_logprobs.append({tokens.text(a): b for a, b in alts})
        lp.text_offset.append(offset)
        pending += tokens.bytes(tid)
        whole = pending.decode("utf-8", errors="ignore")
        if not pending.decode("utf-8", errors="replace").endswith("\ufffd"):
            offset, pending = offset + len(whole), b""
    return lp
