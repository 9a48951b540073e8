"""train_tokenizer.py: each backend writes a directory that `tokenizers` and `AutoTokenizer` load."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import sentencepiece as spm
from tokenizers import Tokenizer
from transformers import AutoTokenizer

from data_pipeline.builtin import generate_stories
from data_pipeline.formats import CHAT_TEMPLATE, EOS_TOKEN, SPECIAL_TOKENS
from data_pipeline.tokenizer import load_tokenizer, tokenizer_hash
from data_pipeline.tokenizer.io import write_hf_configs
from data_pipeline.tokenizer.sentencepiece_backend import sentencepiece_to_hf, train_sentencepiece
from data_pipeline.tokenizer.train_tokenizer import read_stories
from utils.errors import UserError
from utils.paths import REPO_ROOT

SCRIPT = "data_pipeline/tokenizer/train_tokenizer.py"
STORIES = generate_stories(300, seed=3)


def run_script(args: list[str]) -> subprocess.CompletedProcess:
    """Run `python <args>` from the repo root, as a user would."""
    return subprocess.run([sys.executable, *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)


def assert_user_error(proc: subprocess.CompletedProcess, contains: str) -> str:
    """Exit code 2 and exactly one stderr line (no traceback) containing `contains`."""
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1, f"exit {proc.returncode}, stderr:\n{proc.stderr}"
    assert contains in lines[0], lines[0]
    return lines[0]


def write_corpus(data_dir: Path, stories: list[str]) -> Path:
    raw = data_dir / "raw" / "tinystories.txt"
    raw.parent.mkdir(parents=True, exist_ok=True)
    raw.write_text("".join(f"{s}\n{EOS_TOKEN}\n" for s in stories), encoding="utf-8")
    return raw


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory) -> dict[str, tuple[Path, str]]:
    """Run the CLI once per backend on a tiny corpus: backend → (data_dir, its stdout)."""
    runs = {}
    for backend in ("hf", "bpe", "sentencepiece"):
        data_dir = tmp_path_factory.mktemp(backend)
        write_corpus(data_dir, STORIES)
        proc = run_script([SCRIPT, "--data_dir", str(data_dir), "--backend", backend, "--vocab_size", "600"])
        assert proc.returncode == 0, proc.stderr
        runs[backend] = data_dir, proc.stdout
    return runs


@pytest.fixture(params=["hf", "bpe", "sentencepiece"])
def trained_dir(request, cli_runs) -> tuple[str, Path, str]:
    return request.param, *cli_runs[request.param]


def test_cli_writes_a_loadable_directory(trained_dir):
    backend, data_dir, stdout = trained_dir
    out = data_dir / "tokenizer"
    meta = json.loads((out / "tokenizer_meta.json").read_text())
    loaded = load_tokenizer(out)
    assert meta["backend"] == backend and meta["tokenizer_hash"] == tokenizer_hash(out)
    assert meta["vocab_size"] == loaded.tokenizer.get_vocab_size() <= 600
    assert meta["stories"] == len(STORIES) and meta["bytes_used"] == (data_dir / "raw" / "tinystories.txt").stat().st_size
    assert meta["special_tokens"] == loaded.special_ids
    assert (loaded.eos_id, loaded.pad_id) == (meta["special_tokens"][EOS_TOKEN], meta["special_tokens"]["<|pad|>"])
    assert f"{len(STORIES)} stories, {meta['tokens']} tokens" in stdout and len(stdout.strip().splitlines()) == 1
    assert (out / "tokenizer.model").exists() == (backend == "sentencepiece")
    tok = loaded.tokenizer
    for story in STORIES[:50] + ["Zoë 😀 <|im_start|>x<|im_end|>\t\n  end"]:
        ids = tok.encode(story).ids
        assert tok.decode(ids, skip_special_tokens=False) == story
    for t in SPECIAL_TOKENS:
        assert tok.encode(f"a{t}b").ids.count(loaded.special_ids[t]) == 1


def test_autotokenizer_loads_dir_and_renders_chatml(trained_dir):
    _, data_dir, _ = trained_dir
    hf = AutoTokenizer.from_pretrained(str(data_dir / "tokenizer"))
    assert hf.eos_token == EOS_TOKEN and hf.pad_token == "<|pad|>" and hf.bos_token is None
    assert hf.chat_template == CHAT_TEMPLATE and hf.model_max_length == 2048
    messages = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi!"},
                {"role": "assistant", "content": "Hello there."}]
    text = hf.apply_chat_template(messages, tokenize=False)
    assert text == ("<|im_start|>system\nBe kind.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n"
                    "<|im_start|>assistant\nHello there.<|im_end|>\n")
    prompt = hf.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_end|>\n<|im_start|>assistant\n")
    ids = hf(text, add_special_tokens=True)["input_ids"]
    assert ids == Tokenizer.from_file(str(data_dir / "tokenizer" / "tokenizer.json")).encode(text).ids
    assert ids.count(hf.convert_tokens_to_ids("<|im_start|>")) == 3
    assert hf.decode(ids) == text


def test_hf_and_bpe_backends_agree(cli_runs):
    """The CLI's two byte-level backends write the same tokenizer (same hash)."""
    assert tokenizer_hash(cli_runs["hf"][0] / "tokenizer") == tokenizer_hash(cli_runs["bpe"][0] / "tokenizer")


def test_sentencepiece_conversion_encodes_like_sentencepiece():
    lines = [line for s in STORIES for line in s.split("\n") if line]
    proto = train_sentencepiece(lines, 700, SPECIAL_TOKENS)
    sp = spm.SentencePieceProcessor(model_proto=proto)
    hf = sentencepiece_to_hf(proto, SPECIAL_TOKENS)
    unseen = [line for s in generate_stories(100, seed=11) for line in s.split("\n")] + ["Zoë  ran\t😀!"]
    for line in lines + unseen:
        assert hf.encode(line).ids == sp.encode(line), line
        assert hf.decode(hf.encode(line).ids) == line


def test_read_stories_respects_the_limit(tmp_path):
    raw = write_corpus(tmp_path, ["one\ntwo", "three", "é" * 10])
    assert read_stories(raw, 10**6) == (["one\ntwo", "three", "é" * 10], raw.stat().st_size)
    assert read_stories(raw, 10) == (["one\ntwo"], 8)  # whole lines only
    assert read_stories(raw, 6) == (["one"], 4)
    raw.write_text("é" * 10)  # no newline: cut at a whole UTF-8 character
    assert read_stories(raw, 5) == (["éé"], 4)


def test_hash_ignores_formatting(tmp_path):
    doc = {"b": [1, 2], "a": "é"}
    (tmp_path / "x.json").write_text(json.dumps(doc, indent=2))
    (tmp_path / "y.json").write_text(json.dumps(doc, ensure_ascii=False, separators=(",", ":")))
    assert tokenizer_hash(tmp_path / "x.json") == tokenizer_hash(tmp_path / "y.json")
    (tmp_path / "y.json").write_text(json.dumps({**doc, "a": "e"}))
    assert tokenizer_hash(tmp_path / "x.json") != tokenizer_hash(tmp_path / "y.json")


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(UserError, match="train_tokenizer.py"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(UserError, match="not a valid tokenizer.json"):
        load_tokenizer(tmp_path)
    write_hf_configs(tmp_path)
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["chat_template"] == CHAT_TEMPLATE


@pytest.mark.parametrize("case", ["missing", "missing_input", "empty", "tiny_vocab", "bad_limit"])
def test_cli_user_errors(tmp_path, case):
    args = [SCRIPT, "--data_dir", str(tmp_path), "--backend", "bpe"]
    if case == "missing":
        line = assert_user_error(run_script(args), "download_tinystories.py")
        assert str(tmp_path / "raw" / "tinystories.txt") in line
        return
    if case == "missing_input":
        assert_user_error(run_script([*args, "--input", str(tmp_path / "nope.txt")]), "nope.txt not found")
        return
    raw = write_corpus(tmp_path, STORIES[:5])
    if case == "empty":
        raw.write_text(f"\n{EOS_TOKEN}\n  \n")
        assert_user_error(run_script(args), "no text")
    elif case == "tiny_vocab":
        assert_user_error(run_script([*args, "--vocab_size", "259"]), "at least 260")
    else:
        assert_user_error(run_script([*args, "--data_limit_mb", "0"]), "--data_limit_mb")
    assert not (tmp_path / "tokenizer").exists()
