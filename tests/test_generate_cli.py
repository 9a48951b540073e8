"""inference/generate.py as a user runs it: happy paths (text, JSON, speculative) and user errors."""
from __future__ import annotations

import json

import pytest

from conftest import assert_user_error, run_script
from inference import generate
from inference.engine.llm import LLM
from inference.engine.sampling import SamplingParams
from serving_fixtures import make_checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("generate") / "ckpt", max_seq_len=64)


def test_json_output_is_the_greedy_completion(ckpt) -> None:
    proc = run_script(["inference/generate.py", "--checkpoint", str(ckpt), "--prompt", "Once upon a time",
                       "--max_new_tokens", "12", "--temperature", "0", "--device", "cpu", "--json"])
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    expected = LLM(ckpt, device="cpu", dtype="fp32").generate(
        "Once upon a time", SamplingParams(temperature=0, max_tokens=12))[0]
    assert result["text"] == expected.text
    assert result["token_ids"] == expected.token_ids
    assert result["finish_reason"] == expected.finish_reason
    assert result["completion_tokens"] == len(expected.token_ids) <= 12
    assert result["tokens_per_second"] > 0


def test_text_output_and_speculative_decoding(ckpt, capsys) -> None:
    generate.main(["--checkpoint", str(ckpt), "--prompt", "The cat", "--max_new_tokens", "10",
                   "--temperature", "0", "--device", "cpu"])
    plain = capsys.readouterr()
    assert plain.err.startswith("[") and "tok/s" in plain.err
    generate.main(["--checkpoint", str(ckpt), "--prompt", "The cat", "--max_new_tokens", "10",
                   "--temperature", "0", "--device", "cpu", "--draft", str(ckpt), "--num_speculative_tokens", "3",
                   "--json"])
    result = json.loads(capsys.readouterr().out)
    assert result["text"] + "\n" == plain.out  # the draft never changes the greedy output
    assert result["speculative"]["acceptance_rate"] > 0.9  # the draft is the model itself


def test_chat_flag_uses_the_template(ckpt, capsys) -> None:
    generate.main(["--checkpoint", str(ckpt), "--prompt", "hi", "--chat", "--max_new_tokens", "4",
                   "--temperature", "0", "--device", "cpu", "--json"])
    result = json.loads(capsys.readouterr().out)
    assert result["prompt_tokens"] > len("hi")  # the template's special tokens and header


def test_default_length_is_capped_by_the_context_left() -> None:
    assert generate.default_max_tokens(4, 1024) == generate.DEFAULT_MAX_NEW_TOKENS
    assert generate.default_max_tokens(4, 128) == 124
    assert generate.default_max_tokens(128, 128) == 1  # the engine then names the too-long prompt


def test_default_length_fits_a_short_context_and_says_so(ckpt) -> None:
    # The README's first inference command: no --max_new_tokens, a model whose context (64 here)
    # is shorter than prompt + the default 128 tokens.
    proc = run_script(["inference/generate.py", "--checkpoint", str(ckpt), "--prompt", "Once upon a time",
                       "--temperature", "0", "--device", "cpu", "--json"])
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    room = 64 - result["prompt_tokens"]
    assert 0 < result["completion_tokens"] <= room
    notes = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(notes) == 1 and f"at most {room} tokens" in notes[0] and "--max_new_tokens" in notes[0], notes


@pytest.mark.parametrize("extra,message", [
    (["--checkpoint", "{tmp}/missing"], "checkpoint not found"),
    (["--checkpoint", "{tmp}"], "not a checkpoint directory"),
    (["--checkpoint", "{ckpt}", "--top_p", "1.5"], "top_p"),
    (["--checkpoint", "{ckpt}", "--adapter", "{tmp}/no-adapter"], "adapter directory not found"),
    (["--checkpoint", "{ckpt}", "--max_new_tokens", "500"], "max_model_len"),
])
def test_user_errors_exit_2_with_one_line(ckpt, tmp_path, capsys, extra, message) -> None:
    args = [a.format(tmp=tmp_path, ckpt=ckpt) for a in extra] + ["--prompt", "hello", "--device", "cpu"]
    with pytest.raises(SystemExit) as exc:
        from utils.errors import cli_main

        cli_main(lambda: generate.main(args))
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_bad_checkpoint_from_the_shell(tmp_path) -> None:
    (tmp_path / "config.json").write_text("{not json")
    (tmp_path / "model.safetensors").write_bytes(b"")
    proc = run_script(["inference/generate.py", "--checkpoint", str(tmp_path), "--prompt", "hi"])
    assert_user_error(proc, "config.json")
