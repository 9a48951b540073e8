"""The text side of the engine: prompts to token ids, token ids back to streamed text, stop strings.

- `encode_text`: a text prompt as the model's tokenizer encodes it (its BOS, never doubled).
- `IncrementalDetokenizer`: the text a growing token list adds, piece by piece.
- `find_stop` / `partial_stop_len`: OpenAI stop-string semantics (the text ends before the first
  stop string; text that could still become one is held back).
"""
from __future__ import annotations

from tokenizers import Tokenizer


class IncrementalDetokenizer:
    """Text of a growing token list, piece by piece (the prefix/read-offset method of vLLM / TGI).

    Decoding the new tokens together with a few tokens before them keeps word boundaries and
    multi-byte characters right; text ending in an incomplete UTF-8 character is held back.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_len: int) -> None:
        self.tokenizer = tokenizer
        self.prefix_offset = max(prompt_len - 5, 0)
        self.read_offset = prompt_len

    def __call__(self, token_ids: list[int], final: bool = False) -> str:
        """The text added by token_ids[read_offset:]; ``final`` releases incomplete characters."""
        decode = self.tokenizer.decode
        before = decode(token_ids[self.prefix_offset : self.read_offset], skip_special_tokens=True)
        after = decode(token_ids[self.prefix_offset :], skip_special_tokens=True)
        if len(after) <= len(before) or (after.endswith("\ufffd") and not final):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(token_ids)
        return after[len(before) :]


def encode_text(tokenizer: Tokenizer, text: str) -> list[int]:
    """Token ids of a text prompt as the model's tokenizer makes them, with the special tokens its
    post-processor adds (a Llama / Mistral / Gemma BOS, as transformers and vLLM add it; ours add
    none), but never a second BOS before one the text already starts with (a rendered chat prompt)."""
    enc = tokenizer.encode(text)
    ids = enc.ids
    if len(ids) > 1 and enc.special_tokens_mask[0] == 1 and ids[1] == ids[0]:
        return ids[1:]
    return ids


def find_stop(text: str, stops: list[str], start: int) -> int:
    """Index of the earliest stop string in text[start:] (as an index into text), or -1."""
    found = [i for i in (text.find(s, start) for s in stops) if i >= 0]
    return min(found) if found else -1


def partial_stop_len(text: str, stops: list[str]) -> int:
    """Length of the longest end of ``text`` that is a proper beginning of a stop string."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best
