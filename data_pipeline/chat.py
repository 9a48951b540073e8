"""The one chat-template module: conversations as token ids, for our ChatML and imported templates.

Models trained here use ChatML (`formats.CHAT_TEMPLATE`), applied directly as token ids + loss
masks (below). A model imported from Hugging Face keeps its own Jinja template: `ChatFormat`
reads it from the tokenizer directory and renders it like ``transformers``' `apply_chat_template`
(`render_chat_template`), so the prompt ids equal ``AutoTokenizer.apply_chat_template``'s.

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

An imported template is rendered as transformers does: a sandboxed Jinja environment
(``ImmutableSandboxedEnvironment``, trim_blocks, lstrip_blocks, loop controls) with
``raise_exception``, ``strftime_now`` and a ``tojson`` that does not escape HTML; the variables are
``messages``, ``add_generation_prompt``, ``tools`` / ``documents`` (None) and the named special
tokens (``bos_token``, ``eos_token``, ...). The text is then encoded with special tokens parsed
and none added (the template writes the BOS itself: never two). A template that refuses a
conversation (``raise_exception``, e.g. roles that do not alternate) is a ValueError.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, Optional

import jinja2
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from data_pipeline.formats import CHAT_TEMPLATE, EOS_TOKEN, IM_END, IM_START, PAD_TOKEN
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


# ---------------------------------------------------------------------------- a model's own Jinja template
CHAT_TEMPLATE_FILE = "chat_template.jinja"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
RESERVED_VARIABLES = ("messages", "add_generation_prompt", "tools", "documents")  # set by the renderer
NAMED_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read {path}: {e}") from None
    return data if isinstance(data, dict) else {}


def _token_text(value: Any) -> Optional[str]:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def read_chat_template(tokenizer_dir: Path) -> tuple[Optional[str], dict[str, str]]:
    """(chat template or None, named special tokens' texts) of a tokenizer directory, as transformers
    reads them: ``chat_template.jinja`` over tokenizer_config.json's ``chat_template`` (a string, or a
    list of named templates of which "default" is used); special tokens from tokenizer_config.json,
    else special_tokens_map.json."""
    config = _read_json(tokenizer_dir / TOKENIZER_CONFIG_FILE)
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": ..., "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    jinja_file = tokenizer_dir / CHAT_TEMPLATE_FILE
    if jinja_file.is_file():
        template = jinja_file.read_text(encoding="utf-8")
    tokens_map = _read_json(tokenizer_dir / SPECIAL_TOKENS_MAP_FILE)
    special = {}
    for name in NAMED_SPECIAL_TOKENS:
        text = _token_text(config.get(name)) if name in config else _token_text(tokens_map.get(name))
        if text is not None:
            special[name] = text
    return (template if isinstance(template, str) else None), special


class _GenerationTag(Extension):
    """``{% generation %}...{% endgeneration %}`` (transformers marks assistant text with it): its body."""

    tags = {"generation"}

    def parse(self, parser: Any) -> list:
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: Optional[int] = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@lru_cache(maxsize=16)
def compile_chat_template(source: str) -> jinja2.Template:
    """The template compiled in transformers' sandboxed environment (UserError if it does not compile)."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, "jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise UserError(f"the chat template does not compile (line {e.lineno}: {e.message})") from None


def render_chat_template(source: str, messages: list[Message], add_generation_prompt: bool = True,
                         variables: Optional[dict[str, Any]] = None) -> str:
    """The text of `messages` in a Jinja chat template; ``variables``: the special tokens and any
    template options (e.g. Qwen3's ``enable_thinking``). A template that refuses the conversation
    (or fails on it) is a ValueError with its message."""
    template = compile_chat_template(source)
    context = {**(variables or {}), "messages": messages, "tools": None, "documents": None,
               "add_generation_prompt": add_generation_prompt}
    try:
        return template.render(context)
    except (jinja2.TemplateError, TypeError, ValueError, KeyError, IndexError, AttributeError) as e:
        raise ValueError(f"the chat template refused the conversation: {e}") from None


def _check_shape(messages: list[Message], variables: Optional[dict[str, Any]] = None) -> None:
    """ValueError unless a non-empty list of {"role": str, "content": str} (the template judges the
    rest) and template variables that leave the renderer's own alone."""
    reserved = sorted(set(variables or {}) & set(RESERVED_VARIABLES))
    if reserved:
        raise ValueError(f"chat template variables cannot be set: {', '.join(reserved)}")
    if not messages:
        raise ValueError("no messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ValueError(f"message {i} must be {{'role': str, 'content': str}}")


class ChatFormat:
    """How one model's conversations become prompt ids: ChatML by token id for models trained here
    (their tokenizer has the ChatML tokens and no other template), else the model's own Jinja
    template. ``stop_token_ids``: what ends an assistant turn besides the model's eos ids."""

    def __init__(self, tokenizer_file: Path) -> None:
        self.tokenizer_dir = tokenizer_file.parent
        self.template, self.special_tokens = read_chat_template(self.tokenizer_dir)
        tok = Tokenizer.from_file(str(tokenizer_file))
        has_chatml = all(tok.token_to_id(t) is not None for t in (EOS_TOKEN, PAD_TOKEN, IM_START, IM_END))
        self.chatml: Optional[ChatTokenizer] = None
        if has_chatml and self.template in (None, CHAT_TEMPLATE):
            self.chatml = ChatTokenizer.wrap(tok)
        self._tok = tok

    @property
    def kind(self) -> str:
        """"chatml" (ours, by token id), "jinja" (the model's template) or "none" (no template)."""
        return "chatml" if self.chatml is not None else "jinja" if self.template is not None else "none"

    @property
    def stop_token_ids(self) -> list[int]:
        return [self.chatml.im_end_id] if self.chatml is not None else []

    def _template(self) -> str:
        if self.template is None:
            raise UserError(f"{self.tokenizer_dir} has no chat template (no chat_template in {TOKENIZER_CONFIG_FILE}, "
                            f"no {CHAT_TEMPLATE_FILE}) and no ChatML tokens: it can only complete text")
        return self.template

    def render(self, messages: list[Message], add_generation_prompt: bool = True,
               variables: Optional[dict[str, Any]] = None) -> str:
        """The prompt as text (for ChatML: exactly what the ids spell); ``variables`` (e.g.
        ``{"enable_thinking": False}``) go to the template, besides the special tokens."""
        _check_shape(messages, variables)
        source = CHAT_TEMPLATE if self.chatml is not None else self._template()
        return render_chat_template(source, messages, add_generation_prompt, {**self.special_tokens, **(variables or {})})

    def encode_prompt(self, messages: list[Message], variables: Optional[dict[str, Any]] = None) -> list[int]:
        """Prompt ids ending with the assistant's generation header; ``variables`` go to a Jinja template."""
        _check_shape(messages, variables)
        if self.chatml is not None:
            return encode_prompt(self.chatml, messages)
        return self._tok.encode(self.render(messages, True, variables), add_special_tokens=False).ids
