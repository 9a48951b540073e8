"""Applying the one chat template (ChatML, `formats.CHAT_TEMPLATE`) to token ids + loss masks.

A conversation is an OpenAI-style list of messages `{"role", "content"}`. Each message becomes
one *turn* of tokens, exactly the text the template renders:

    <|im_start|> role "\\n" content <|im_end|> "\\n"

Special tokens are always added by id and message text is encoded with the tokenizer's
special-token parsing switched off, so a literal "<|im_end|>" typed by a user stays plain text
and can never end a turn. A system/user turn is encoded as the template renders it
("role\\ncontent" in one piece, as `apply_chat_template` + encode gives). An assistant turn
encodes its header "assistant\\n" and its content apart, because at generation time the prompt
ends with the header and the model produces the content from scratch; for ordinary text (not
starting with whitespace) both ways give the same ids.

Loss mask (what SFT learns, as in InstructGPT-style supervised fine-tuning): the assistant's
content tokens and its closing <|im_end|> are targets (1); everything else — system and user
turns, the assistant header, the "\\n" after <|im_end|> — is context (0).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from tokenizers import Tokenizer

from data_pipeline.formats import EOS_TOKEN, IM_END, IM_START, PAD_TOKEN
from utils.errors import UserError

ROLES = ("system", "user", "assistant")
Message = dict[str, str]


@dataclass
class ChatTokenizer:
    """A HF `tokenizers.Tokenizer` plus the ids of the four special tokens."""

    tok: Tokenizer
    eos_id: int
    pad_id: int
    im_start_id: int
    im_end_id: int

    @classmethod
    def wrap(cls, tok: Tokenizer) -> "ChatTokenizer":
        """Look up the special tokens (UserError when one is missing) and switch off special-token
        parsing inside text (`encode_special_tokens`), so specials only ever come from ids."""
        ids = {}
        for name in (EOS_TOKEN, PAD_TOKEN, IM_START, IM_END):
            i = tok.token_to_id(name)
            if i is None:
                raise UserError(f"the tokenizer has no special token {name}: retrain it with "
                                "`python data_pipeline/tokenizer/train_tokenizer.py`")
            ids[name] = i
        tok.encode_special_tokens = True
        return cls(tok, ids[EOS_TOKEN], ids[PAD_TOKEN], ids[IM_START], ids[IM_END])

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Encode many texts at once (the Rust encoder runs them in parallel)."""
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]


@dataclass
class Turn:
    """One message as tokens: [<|im_start|>, header..., content..., <|im_end|>, "\\n"...]."""

    role: str
    head: list[int]      # <|im_start|> + "role\n" (for system/user: + content, encoded together)
    content: list[int]   # assistant content only (empty for system/user)
    tail: list[int]      # <|im_end|> + "\n"

    @property
    def ids(self) -> list[int]:
        return self.head + self.content + self.tail

    @property
    def mask(self) -> list[int]:
        if self.role != "assistant":
            return [0] * (len(self.head) + len(self.tail))
        # content and <|im_end|> are targets; the header and the trailing "\n" are not
        return [0] * len(self.head) + [1] * (len(self.content) + 1) + [0] * (len(self.tail) - 1)


def check_messages(messages: list[Message], last_role: str = "assistant") -> None:
    """Raise ValueError unless: optional system first, then user/assistant alternating from
    user, ending with `last_role`; every content a string."""
    if not messages:
        raise ValueError("no messages")
    for i, m in enumerate(messages):
        if set(m) != {"role", "content"}:
            raise ValueError(f"message {i} must have exactly the keys role, content (got {sorted(m)})")
        if m["role"] not in ROLES:
            raise ValueError(f"message {i} has role {m['role']!r}; allowed: {', '.join(ROLES)}")
        if not isinstance(m["content"], str):
            raise ValueError(f"message {i} content is not a string")
    body = messages[1:] if messages[0]["role"] == "system" else messages
    for i, m in enumerate(body):
        want = "user" if i % 2 == 0 else "assistant"
        if m["role"] != want:
            raise ValueError(f"turns must alternate user/assistant starting with user, "
                             f"found {m['role']!r} where {want!r} belongs")
    if not body or body[-1]["role"] != last_role:
        raise ValueError(f"the conversation must end with a {last_role} turn")


def encode_turns(ct: ChatTokenizer, messages: list[Message]) -> list[Turn]:
    """Every message as a `Turn` (see the module docstring for how text is split)."""
    texts: list[str] = []
    for m in messages:
        if m["role"] == "assistant":
            texts += ["assistant\n", m["content"]]
        else:
            texts.append(f"{m['role']}\n{m['content']}")
    texts.append("\n")
    encoded = ct.encode_batch(texts)
    newline = encoded.pop()
    turns, k = [], 0
    for m in messages:
        if m["role"] == "assistant":
            head, content = encoded[k], encoded[k + 1]
            k += 2
        else:
            head, content = encoded[k], []
            k += 1
        turns.append(Turn(m["role"], [ct.im_start_id] + head, content, [ct.im_end_id] + newline))
    return turns


def join_turns(turns: list[Turn], max_len: int) -> Optional[tuple[list[int], list[int], bool]]:
    """Concatenate turns into (ids, mask, truncated) of at most `max_len` tokens.

    Whole turns are kept while they fit. An assistant turn that does not fit is cut inside its
    content and still closed with <|im_end|> (a target); any other turn that does not fit is
    dropped with everything after it, as is a trailing "\\n". Returns None when no target token
    is left (e.g. the first user turn alone is longer than `max_len`).
    """
    ids: list[int] = []
    mask: list[int] = []
    truncated = False
    for t in turns:
        room = max_len - len(ids)
        if len(t.ids) <= room:
            ids += t.ids
            mask += t.mask
            continue
        truncated = True
        keep = len(t.ids) - len(t.tail) + 1  # everything up to and including <|im_end|>
        if keep <= room:
            ids += t.ids[:keep]
            mask += t.mask[:keep]
        elif t.role == "assistant" and room >= len(t.head) + 2:  # ≥ 1 content token + <|im_end|>
            n = room - len(t.head) - 1
            ids += t.head + t.content[:n] + t.tail[:1]
            mask += [0] * len(t.head) + [1] * (n + 1)
        break
    if not any(mask):
        return None
    return ids, mask, truncated


def encode_chat(ct: ChatTokenizer, messages: list[Message], max_len: int
                ) -> Optional[tuple[list[int], list[int], bool]]:
    """A whole conversation as (ids, loss mask, truncated) — see `join_turns`."""
    return join_turns(encode_turns(ct, messages), max_len)


def encode_prompt(ct: ChatTokenizer, messages: list[Message]) -> list[int]:
    """Prompt ids ending with the generation header `<|im_start|>assistant\\n`."""
    ids = [i for t in encode_turns(ct, messages) for i in t.ids]
    return ids + [ct.im_start_id] + ct.encode("assistant\n")


def encode_response(ct: ChatTokenizer, content: str) -> list[int]:
    """Assistant reply ids closed by <|im_end|> (what follows `encode_prompt`)."""
    return ct.encode(content) + [ct.im_end_id]
