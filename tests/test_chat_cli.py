"""The terminal chat (inference/chat.py): one-shot and interactive runs as a user types them,
multi-turn history, Ctrl-C during a reply, user errors (exit 2, one line)."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

import pytest
import torch

from conftest import assert_user_error, run_script
from utils.errors import UserError
from utils.paths import REPO_ROOT
from serving_fixtures import make_checkpoint

from inference import chat
from inference.engine.sampling import SamplingParams

STATS = re.compile(r"^\[(\d+) tokens, [0-9.]+ tok/s(, [a-z ]+)?\]$")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("chat") / "ckpt")


@pytest.fixture(scope="module")
def engine(ckpt):
    from inference.engine.llm_engine import LLMEngine

    return LLMEngine(ckpt, device="cpu", dtype="float32", kv_cache_memory_mb=4)


def greedy_reply(engine, messages: list[dict], max_tokens: int) -> str:
    im_end = engine.tokenizer.token_to_id("<|im_end|>")
    rid = engine.add_request(engine.encode_chat(messages),
                             SamplingParams(temperature=0, max_tokens=max_tokens, stop_token_ids=[im_end]))
    text = []
    while engine.has_unfinished():
        text += [o.new_text for o in engine.step() if o.request_id == rid]
    return "".join(text)


def test_missing_checkpoint_is_a_user_error(tmp_path):
    proc = run_script(["inference/chat.py", "--checkpoint", str(tmp_path / "nope"), "--prompt", "hi"])
    assert_user_error(proc, "nope")


def test_bad_checkpoint_is_a_user_error(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(UserError, match="checkpoint"):
        chat.main(["--checkpoint", str(tmp_path), "--prompt", "hi"])


def test_bad_sampling_flag_fails_before_the_model_loads(tmp_path):
    with pytest.raises(UserError, match="top_p"):  # an empty dir: the model is never loaded
        chat.main(["--checkpoint", str(tmp_path), "--top_p", "1.5", "--prompt", "hi"])


def test_one_shot_prompt_prints_the_reply(ckpt, engine):
    proc = run_script(["inference/chat.py", "--checkpoint", str(ckpt), "--prompt", "Tell me a story",
                       "--system", "Be brief.", "--temperature", "0", "--max_new_tokens", "10", "--device", "cpu"])
    assert proc.returncode == 0, proc.stderr
    expected = greedy_reply(engine, [{"role": "system", "content": "Be brief."},
                                     {"role": "user", "content": "Tell me a story"}], 10)
    assert proc.stdout == expected + "\n" and expected
    stats = [ln for ln in proc.stderr.splitlines() if STATS.match(ln)]
    assert len(stats) == 1 and 1 <= int(STATS.match(stats[0]).group(1)) <= 10


def test_interactive_session(ckpt):
    proc = subprocess.run([sys.executable, "inference/chat.py", "--checkpoint", str(ckpt), "--max_new_tokens", "6",
                           "--seed", "1", "--device", "cpu"], input="Hello\n/reset\n\nHi again\n/quit\nnever sent\n",
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("assistant> ") == 2 and "(conversation cleared)" in proc.stdout
    assert len([ln for ln in proc.stderr.splitlines() if STATS.match(ln)]) == 2


def test_history_is_kept_and_reset(engine, monkeypatch, capsys):
    typed = iter(["Hello", "And then?", "/reset", "New start", "/quit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(typed))
    seen: list[list[dict]] = []
    encode_chat = engine.encode_chat
    monkeypatch.setattr(engine, "encode_chat", lambda messages: seen.append(messages) or encode_chat(messages))
    args = chat.parse_args(["--checkpoint", "unused", "--temperature", "0", "--max_new_tokens", "5"])
    system = [{"role": "system", "content": "S"}]
    chat.interactive(args, engine, system, "tiny")
    first_reply = greedy_reply(engine, system + [{"role": "user", "content": "Hello"}], 5)
    assert seen[:3] == [
        system + [{"role": "user", "content": "Hello"}],
        system + [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": first_reply},
                  {"role": "user", "content": "And then?"}],
        system + [{"role": "user", "content": "New start"}],
    ]
    assert first_reply in capsys.readouterr().out


def test_ctrl_c_stops_the_reply_and_frees_its_blocks(engine, capsys):
    free = engine.num_free_blocks
    real_step = engine.step
    calls = []

    def step():
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)  # the user presses Ctrl-C mid-reply
        return real_step()

    engine.step = step
    try:
        params = SamplingParams(temperature=1.0, max_tokens=200, ignore_eos=True)
        reply = chat.stream_reply(engine, engine.encode_chat([{"role": "user", "content": "Hi"}]), params,
                                  sys.stdout)
    finally:
        del engine.step
    assert reply.finish_reason == "interrupted" and reply.num_tokens < 200 and len(calls) <= 4
    assert not engine.has_unfinished() and engine.num_free_blocks == free
    assert capsys.readouterr().out == reply.text


def test_conversation_outgrowing_the_kv_pool_drops_the_oldest_exchanges(ckpt, monkeypatch, capsys):
    """Regression: a KV pool smaller than the context overflowed with a traceback (only
    max_model_len was checked). Now the oldest exchanges go, with a note; a message that alone
    does not fit is refused and the chat goes on."""
    from inference.engine.llm_engine import LLMEngine
    from inference.engine.paged_cache import kv_bytes_per_token
    from model.config import ModelConfig
    from utils.checkpoint import load_checkpoint

    cfg = ModelConfig(**load_checkpoint(ckpt).model_config)
    pool_mb = 6 * 16 * kv_bytes_per_token(cfg, torch.float32) / 2**20  # 6 blocks of 16 tokens
    engine = LLMEngine(ckpt, device="cpu", dtype="float32", max_num_seqs=1, kv_cache_memory_mb=pool_mb)
    assert engine.num_total_blocks * 16 < engine.max_model_len
    typed = iter(["Once upon a time there was a little cat"] * 6 + ["a b c " * 60, "Hello", "/quit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(typed))
    seen: list[list[dict]] = []
    encode_chat = engine.encode_chat
    monkeypatch.setattr(engine, "encode_chat", lambda messages: seen.append(messages) or encode_chat(messages))
    args = chat.parse_args(["--checkpoint", "unused", "--temperature", "0", "--max_new_tokens", "16"])
    chat.interactive(args, engine, [{"role": "system", "content": "S"}], "tiny")
    out = capsys.readouterr().out
    assert "dropped the oldest" in out and "the KV cache holds" in out and "shorten it" in out
    assert out.count("assistant> ") == 7  # every message but the over-long one got a reply
    assert all(m[0]["role"] == "system" and m[1]["role"] == "user" for m in seen)  # whole exchanges dropped
    assert seen[-1][-1]["content"] == "Hello" and len(encode_chat(seen[-1])) < engine.num_total_blocks * 16
    assert not engine.has_unfinished()
