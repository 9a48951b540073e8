"""Logprob ``bytes`` are each token's own bytes, also for tokens that hold part of a UTF-8 character.

Byte-level BPE splits characters such as "😀" into tokens of one or two bytes each; OpenAI reports
those raw bytes, and a client joins them to rebuild the text. The reference for byte-level
pieces is GPT-2's byte-to-character table as transformers ships it; SentencePiece pieces
(``<0xNN>`` byte fallback, "▁" for a space) are checked on text whose bytes are known. On the
live server every reported token's bytes must match, and ``/v1/completions``' ``top_logprobs``
must keep distinct tokens under distinct keys (they used to collapse onto "\\ufffd").
"""
from __future__ import annotations

from types import SimpleNamespace

import openai
import pytest
from tokenizers import Tokenizer

from chat_template_fixtures import make_tokenizer_dir
from inference.serving.logprobs import TokenBytes, completion_logprobs
from serving_fixtures import make_checkpoint, make_tokenizer, serve_checkpoint

transformers = pytest.importorskip("transformers")
from transformers.convert_slow_tokenizer import bytes_to_unicode  # noqa: E402
TEXT = "Zoë 😀 café “merci”"


def reference_bytes(tok: Tokenizer, token_id: int) -> bytes:
    """A byte-level token's bytes through transformers' copy of GPT-2's table."""
    table = {c: b for b, c in bytes_to_unicode().items()}
    piece = tok.id_to_token(token_id)
    if token_id in tok.get_added_tokens_decoder():
        return piece.encode()
    return bytes(table[c] for c in piece)


def test_byte_level_tokens_give_their_raw_bytes(tmp_path):
    tok = Tokenizer.from_file(str(make_tokenizer(tmp_path / "tok") / "tokenizer.json"))
    tb = TokenBytes(tok)
    assert all(tb.bytes(i) == reference_bytes(tok, i) for i in range(tok.get_vocab_size()))
    ids = tok.encode(TEXT).ids
    assert any(tb.bytes(i).decode("utf-8", errors="replace") == "\ufffd" for i in ids)  # a split character
    assert b"".join(tb.bytes(i) for i in ids) == TEXT.encode()
    partial = next(i for i in ids if len(tb.bytes(i)) == 1 and tb.bytes(i)[0] >= 0x80)
    assert tb.text(partial) == f"\\x{tb.bytes(partial)[0]:02x}"  # an escape, not "\ufffd"


@pytest.mark.parametrize("family, prefix", [("mistral", b" "), ("gemma3", b""), ("qwen2.5", b"")])
def test_other_tokenizer_layouts(family, prefix, tmp_path):
    tok = Tokenizer.from_file(str(make_tokenizer_dir(family, tmp_path / family) / "tokenizer.json"))
    tb = TokenBytes(tok)
    ids = tok.encode(TEXT, add_special_tokens=False).ids
    assert b"".join(tb.bytes(i) for i in ids) == prefix + TEXT.encode()  # Metaspace "first" adds a space
    specials = tok.encode("<|im_end|>" if family == "qwen2.5" else "<s>" if family == "mistral" else "<bos>",
                          add_special_tokens=False).ids
    assert tb.text(specials[0]) in ("<|im_end|>", "<s>", "<bos>")


def test_completion_offsets_count_a_split_character_once(tmp_path):
    tok = Tokenizer.from_file(str(make_tokenizer(tmp_path / "tok") / "tokenizer.json"))
    tb = TokenBytes(tok)
    ids = tok.encode("a😀b").ids
    out = SimpleNamespace(logprobs=[(i, -1.0, [(i, -1.0)]) for i in ids])
    lp = completion_logprobs(tb, out, 10)
    assert lp.text_offset[0] == 10 and lp.text_offset[-1] == 12  # "a", then "😀" whole, then "b"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    with serve_checkpoint(make_checkpoint(tmp_path_factory.mktemp("lp") / "ckpt")) as (engine, server):
        yield engine, openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)


def test_server_reports_each_tokens_raw_bytes(served):
    """Regression: partial-character tokens were reported with the bytes of "\\ufffd"."""
    engine, client = served
    r = client.chat.completions.create(model="tiny-test", messages=[{"role": "user", "content": TEXT}],
                                       temperature=0, max_tokens=24, logprobs=True, top_logprobs=5,
                                       extra_body={"ignore_eos": True})
    tok = engine.tokenizer
    by_bytes: dict[bytes, str] = {reference_bytes(tok, i): tok.id_to_token(i) for i in range(tok.get_vocab_size())}
    checked = partial = 0
    for entry in r.choices[0].logprobs.content:
        for t in [entry, *entry.top_logprobs]:
            raw = bytes(t.bytes)
            assert raw in by_bytes, f"{t.token!r} {raw!r} is no token's bytes"
            assert t.token == raw.decode("utf-8", errors="backslashreplace")
            checked += 1
            partial += raw.decode("utf-8", errors="replace") != raw.decode("utf-8", errors="ignore")
    assert checked == 24 * 6 and partial > 0


def test_completion_top_logprobs_keep_distinct_tokens_apart(served):
    """Regression: distinct partial-character tokens collapsed onto one "\\ufffd" key."""
    _, client = served
    c = client.completions.create(model="tiny-test", prompt=TEXT, temperature=0, max_tokens=16, logprobs=5,
                                  extra_body={"ignore_eos": True}).choices[0]
    assert len(c.logprobs.top_logprobs) == 16
    assert all(len(top) == 5 for top in c.logprobs.top_logprobs)
    assert any(key.startswith("\\x") for top in c.logprobs.top_logprobs for key in top)
