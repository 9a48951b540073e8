"""A model's own chat template (data_pipeline/chat.py `ChatFormat`), checked against transformers.

For the official templates of Llama 3 / 3.1, Qwen2.5 / Qwen3, Mistral and Gemma 2 / 3 (kept in
chat_template_fixtures.py) on tokenizer directories laid out like theirs, the prompt text and ids
must equal ``AutoTokenizer.apply_chat_template(..., add_generation_prompt=True)``: system
messages, multi-turn history, template options, a single BOS, and the same refusals. Our own
tokenizers keep ChatML by token id.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from chat_template_fixtures import FAMILIES, make_tokenizer_dir
from data_pipeline.chat import ChatFormat, ChatTokenizer, encode_prompt, render_chat_template
from serving_fixtures import make_tokenizer
from utils.errors import UserError

transformers = pytest.importorskip("transformers")

SYSTEM = {"role": "system", "content": "You are a helpful assistant.  Be brief."}
CONVERSATIONS = {
    "one user turn": [{"role": "user", "content": "Hello there! What is 2 + 2?"}],
    "system + user": [SYSTEM, {"role": "user", "content": "Tell me a story about a dog."}],
    "multi-turn": [SYSTEM, {"role": "user", "content": " Hi Tom "}, {"role": "assistant", "content": "Hello, Sue!\n"},
                   {"role": "user", "content": "Zoë 😀 ate a café crêpe.\n\nAnd then?"}],
    "specials in text": [{"role": "user", "content": "say <|im_end|> or </s> or <end_of_turn>"}],
}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family_dir(request, tmp_path_factory) -> tuple[str, Path]:
    return request.param, make_tokenizer_dir(request.param, tmp_path_factory.mktemp(request.param))


def _reference(directory: Path, messages: list[dict], **kwargs):
    """(text, ids) from transformers, or the exception it raises."""
    tok = transformers.AutoTokenizer.from_pretrained(str(directory))
    try:
        text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **kwargs)
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                      **kwargs)["input_ids"]
    except Exception as e:  # the template refused the conversation (raise_exception)
        return e
    return text, list(ids)


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_prompt_ids_equal_transformers(family_dir, name):
    family, directory = family_dir
    messages = CONVERSATIONS[name]
    fmt = ChatFormat(directory / "tokenizer.json")
    assert fmt.kind == "jinja" and fmt.stop_token_ids == []
    expected = _reference(directory, messages)
    if isinstance(expected, Exception):  # e.g. Gemma 2 has no system role: both refuse
        with pytest.raises(ValueError, match="chat template refused"):
            fmt.encode_prompt(messages)
        return
    text, ids = expected
    assert fmt.render(messages) == text
    assert fmt.encode_prompt(messages) == ids
    bos = FAMILIES[family].bos
    if bos is not None:  # the template writes the BOS; nothing adds a second one
        bos_id = fmt._tok.token_to_id(bos)
        assert ids[0] == bos_id and ids.count(bos_id) == 1


def test_template_options_reach_the_template(tmp_path):
    directory = make_tokenizer_dir("qwen3", tmp_path / "qwen3")
    messages = CONVERSATIONS["system + user"]
    fmt = ChatFormat(directory / "tokenizer.json")
    text, ids = _reference(directory, messages, enable_thinking=False)
    assert text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert fmt.encode_prompt(messages, {"enable_thinking": False}) == ids
    assert fmt.encode_prompt(messages) != ids


def test_refusals_and_template_errors_are_value_errors(tmp_path):
    directory = make_tokenizer_dir("mistral", tmp_path / "mistral")
    fmt = ChatFormat(directory / "tokenizer.json")
    with pytest.raises(ValueError, match="must alternate"):
        fmt.encode_prompt([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    with pytest.raises(ValueError, match="message 0"):
        fmt.encode_prompt([{"role": "user", "content": 3}])
    with pytest.raises(ValueError, match="no messages"):
        fmt.encode_prompt([])
    with pytest.raises(ValueError, match="cannot be set: messages"):
        fmt.encode_prompt([{"role": "user", "content": "a"}], {"messages": [], "source": 1})
    with pytest.raises(UserError, match="does not compile"):
        render_chat_template("{% for %}", [{"role": "user", "content": "a"}])


def test_generation_tag_and_filters_render_like_transformers(tmp_path):
    template = ("{% for m in messages %}{% if m.role == 'assistant' %}{% generation %}{{ m.content }}"
                "{% endgeneration %}{% else %}{{ m | tojson }}{% endif %}{% endfor %}")
    messages = [{"role": "user", "content": "<b>é</b>"}, {"role": "assistant", "content": "ok"}]
    ref = transformers.utils.chat_template_utils.render_jinja_template([messages], chat_template=template)[0][0]
    assert render_chat_template(template, messages, add_generation_prompt=False) == ref


def test_our_tokenizer_keeps_chatml_by_token_id(tmp_path):
    directory = make_tokenizer(tmp_path / "ours")
    fmt = ChatFormat(directory / "tokenizer.json")
    messages = CONVERSATIONS["specials in text"]
    assert fmt.kind == "chatml"
    ct = ChatTokenizer.wrap(__import__("tokenizers").Tokenizer.from_file(str(directory / "tokenizer.json")))
    assert fmt.encode_prompt(messages) == encode_prompt(ct, messages)
    assert fmt.stop_token_ids == [ct.im_end_id]
    assert fmt.render(messages).endswith("<|im_start|>assistant\n")


def test_no_template_and_no_chatml_tokens_is_a_user_error(tmp_path):
    directory = make_tokenizer_dir("llama3", tmp_path / "plain")
    (directory / "tokenizer_config.json").write_text('{"bos_token": "<|begin_of_text|>"}')
    fmt = ChatFormat(directory / "tokenizer.json")
    assert fmt.kind == "none"
    with pytest.raises(UserError, match="no chat template"):
        fmt.encode_prompt(CONVERSATIONS["one user turn"])


def test_chat_template_jinja_file_wins(tmp_path):
    directory = make_tokenizer_dir("llama3", tmp_path / "jinja")
    (directory / "chat_template.jinja").write_text("{{ bos_token }}{{ messages[0]['content'] }}")
    fmt = ChatFormat(directory / "tokenizer.json")
    assert fmt.render(CONVERSATIONS["one user turn"]) == "<|begin_of_text|>Hello there! What is 2 + 2?"
