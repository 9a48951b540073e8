"""Processing steps: chat template + loss masks, input formats, HH-RLHF split, the four scripts
end to end on tiny data, their failure modes (exit 2, one line), and the shared real data.

The tokenizer here is a tiny byte-level BPE trained with HF `tokenizers` in a fixture, so these
tests depend on no other step of the pipeline.
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from data_pipeline.builtin import generate_stories
from data_pipeline.chat import ChatTokenizer, encode_chat, encode_prompt, encode_response, encode_turns, join_turns
from data_pipeline.chat_loaders import PreferenceLoader, SFTLoader
from data_pipeline.formats import CHAT_TEMPLATE, EOS_TOKEN, SPECIAL_TOKENS, DataLayout, TokenBin
from data_pipeline.loader import PretrainLoader
from data_pipeline.processing import build_preference_bins, build_sft_bins, encode_stories
from data_pipeline.processing.build_preference_bins import split_hh
from data_pipeline.processing.build_sft_bins import detect_format, to_messages
from data_pipeline.tokenizer.io import tokenizer_hash, write_hf_configs
from conftest import assert_user_error, run_script
from utils.errors import UserError

SCRIPTS = "data_pipeline/processing/"


def _train_tokenizer(out_dir, vocab_size, texts):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    write_hf_configs(out_dir)
    return out_dir


@pytest.fixture(scope="session")
def tok_dir(tmp_path_factory):
    return _train_tokenizer(tmp_path_factory.mktemp("tok"), 512, generate_stories(200, seed=1))


@pytest.fixture(scope="session")
def ct(tok_dir):
    return ChatTokenizer.wrap(Tokenizer.from_file(str(tok_dir / "tokenizer.json")))


@pytest.fixture
def data_dir(tmp_path, tok_dir):
    shutil.copytree(tok_dir, tmp_path / "tokenizer")
    return tmp_path


def _targets(ct, ids, mask):
    """Decoded runs of consecutive target tokens."""
    runs, cur = [], []
    for i, m in zip(ids, mask):
        if m:
            cur.append(i)
        elif cur:
            runs.append(cur)
            cur = []
    runs += [cur] if cur else []
    return [ct.tok.decode(r, skip_special_tokens=False) for r in runs]


CONV = [
    {"role": "system", "content": "Be kind."},
    {"role": "user", "content": "Tell me about the cat."},
    {"role": "assistant", "content": "The cat sat on the mat."},
    {"role": "user", "content": "And then?"},
    {"role": "assistant", "content": "Then it slept."},
]


# ------------------------------------------------------------------------------- chat template
def test_first_response_token_is_a_target(ct):
    msgs = CONV[1:3]
    ids, mask, truncated = encode_chat(ct, msgs, 512)
    header = [ct.im_start_id] + ct.encode("assistant\n")
    start = next(i for i in range(len(ids)) if ids[i:i + len(header)] == header) + len(header)
    assert mask[start] == 1 and mask[start - 1] == 0
    assert ids[start] == ct.encode("The cat sat on the mat.")[0]
    assert not truncated and sum(mask[:start]) == 0


def test_multi_turn_masks(ct):
    ids, mask, _ = encode_chat(ct, CONV, 512)
    assert _targets(ct, ids, mask) == ["The cat sat on the mat.<|im_end|>", "Then it slept.<|im_end|>"]
    assert ids[-1] == ct.encode("\n")[0] and mask[-1] == 0  # the "\n" after <|im_end|> is no target


def test_ids_match_hf_apply_chat_template(ct, tok_dir):
    from transformers import PreTrainedTokenizerFast  # the reference; imported here as it is slow

    ref_tok = PreTrainedTokenizerFast(tokenizer_file=str(tok_dir / "tokenizer.json"))
    ref = ref_tok.apply_chat_template(CONV, chat_template=CHAT_TEMPLATE, tokenize=True, return_dict=True)
    ids, _, _ = encode_chat(ct, CONV, 512)
    assert ids == list(ref["input_ids"])
    prompt = ref_tok.apply_chat_template(CONV[:4], chat_template=CHAT_TEMPLATE, add_generation_prompt=True,
                                         tokenize=False)
    assert encode_prompt(ct, CONV[:4]) == ref_tok(prompt, add_special_tokens=False)["input_ids"]


def test_prompt_plus_response_equals_the_conversation(ct):
    ids, _, _ = encode_chat(ct, CONV, 512)
    assert encode_prompt(ct, CONV[:4]) + encode_response(ct, CONV[4]["content"]) == ids[:-1]


def test_special_token_text_in_content_stays_text(ct):
    ids, mask, _ = encode_chat(ct, [{"role": "user", "content": "say <|im_end|> now"},
                                    {"role": "assistant", "content": "ok"}], 512)
    assert ids.count(ct.im_end_id) == 2  # only the two real turn ends


def test_truncation_keeps_im_end(ct):
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "the cat " * 100}]
    ids, mask, truncated = encode_chat(ct, msgs, 40)
    assert truncated and len(ids) == 40
    assert ids[-1] == ct.im_end_id and mask[-1] == 1
    assert sum(mask) > 1
    # a prompt alone over the limit leaves no target: dropped
    assert encode_chat(ct, [{"role": "user", "content": "a b " * 100}, msgs[1]], 40) is None
    # a later user turn that does not fit is dropped whole; the earlier answer stays
    turns = encode_turns(ct, CONV)
    keep = sum(len(t.ids) for t in turns[:3])
    ids2, mask2, truncated2 = join_turns(turns, keep + 3)
    assert truncated2 and len(ids2) == keep and _targets(ct, ids2, mask2) == ["The cat sat on the mat.<|im_end|>"]


# ------------------------------------------------------------------------------- input formats
def test_input_formats_to_messages():
    alpaca = {"instruction": "Add.", "input": "2 and 3", "output": "5"}
    assert detect_format(alpaca) == "alpaca"
    assert to_messages(alpaca, 0, "alpaca") == [{"role": "user", "content": "Add.\n\n2 and 3"},
                                                {"role": "assistant", "content": "5"}]
    share = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}], "system": "S"}
    assert [m["role"] for m in to_messages(share, 0, detect_format(share))] == ["system", "user", "assistant"]
    openai = {"messages": CONV}
    assert to_messages(openai, 0, detect_format(openai)) == CONV
    with pytest.raises(UserError, match="record 3: unknown field 'extra'"):
        to_messages({**alpaca, "extra": 1}, 3, "alpaca")
    with pytest.raises(UserError, match="unknown speaker 'bot'"):
        to_messages({"conversations": [{"from": "bot", "value": "x"}]}, 0, "sharegpt")
    with pytest.raises(UserError, match="must end with a assistant turn"):
        to_messages({"messages": CONV[:2]}, 0, "openai")


def test_hh_rlhf_prefix_split():
    base = "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: Tell me a joke"
    prompt, chosen, rejected = split_hh(base + "\n\nAssistant: Why did the chicken cross?",
                                        base + "\n\nAssistant: Why not.")
    # the shared text runs into the reply ("Why "), but the prompt stops at the last Assistant:
    assert prompt == [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"},
                      {"role": "user", "content": "Tell me a joke"}]
    assert (chosen, rejected) == ("Why did the chicken cross?", "Why not.")
    with pytest.raises(ValueError, match="before the last turn"):
        split_hh(base + "\n\nAssistant: A\n\nHuman: more", base + "\n\nAssistant: B")


# --------------------------------------------------------------------------- scripts end to end
def _write_raw(data_dir, stories):
    raw = data_dir / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    (raw / "tinystories.txt").write_text("".join(f"{s}\n{EOS_TOKEN}\n" for s in stories), encoding="utf-8")
    (raw / "tinystories.json").write_text(json.dumps({"source": "test"}))


def test_pipeline_happy_path(data_dir):
    stories = generate_stories(60, seed=7)
    _write_raw(data_dir, stories)
    d = ["--data_dir", str(data_dir)]
    for cmd in (["encode_stories.py"], ["build_pretrain_bins.py", "--val_fraction", "0.1"],
                ["build_sft_bins.py", "--num_instructions", "40", "--num_conversations", "20"],
                ["build_preference_bins.py", "--num_pairs", "30"]):
        p = run_script([SCRIPTS + cmd[0], *d, *cmd[1:]])
        assert p.returncode == 0, p.stderr
        summary = p.stdout.strip().splitlines()
        assert len(summary) == 1 and "tokens" in summary[0] and "bytes" in summary[0], p.stdout
    lay, h = DataLayout(data_dir), tokenizer_hash(data_dir / "tokenizer")
    enc = TokenBin(lay.encoded_stories, "encoded", tokenizer_hash=h)
    ct = ChatTokenizer.wrap(Tokenizer.from_file(str(data_dir / "tokenizer" / "tokenizer.json")))
    assert len(enc) == 60 and ct.tok.decode(enc.item(5)[:-1].tolist()) == stories[5]
    assert int(enc.item(5)[-1]) == ct.eos_id
    train, val = (TokenBin(lay.pretrain(s), "pretrain", tokenizer_hash=h) for s in ("train", "val"))
    assert (len(train), len(val)) == (54, 6)
    assert train.sidecar.num_tokens + val.sidecar.num_tokens == enc.sidecar.num_tokens
    assert int((np.asarray(val.tokens) == ct.eos_id).sum()) == 6
    batch = next(PretrainLoader(lay.pretrain("train"), seq_len=32, batch_size=2, vocab_size=512, tokenizer_hash=h))
    assert batch["input_ids"].shape == (2, 32)
    sft = TokenBin(lay.sft("train"), "sft", tokenizer_hash=h)
    assert len(sft) + len(TokenBin(lay.sft("val"), "sft")) == 60
    rows = next(SFTLoader(lay.sft("train"), seq_len=512, batch_size=2, tokenizer_hash=h))
    assert (rows["labels"] != -100).any()
    pair = next(PreferenceLoader(lay.preference("train"), batch_size=4, tokenizer_hash=h))
    assert pair["chosen_input_ids"].shape[0] == 4
    side = json.loads((data_dir / "pretrain" / "train.json").read_text())
    assert side["source"]["path"] == "encoded/stories" and side["tokenizer_hash"] == h


def test_encode_with_dedup_and_pii_scrub(data_dir, capsys):
    stories = generate_stories(6, seed=4)
    _write_raw(data_dir, stories + [stories[2], "Write to me at tom@example.com today, said the cat."])
    encode_stories.main(["--data_dir", str(data_dir), "--dedup", "--scrub_pii"])
    enc = TokenBin(DataLayout(data_dir).encoded_stories, "encoded")
    assert enc.sidecar.stats["exact_duplicates_removed"] == 1 and enc.sidecar.stats["pii_replaced"] == 1
    ct = ChatTokenizer.wrap(Tokenizer.from_file(str(data_dir / "tokenizer" / "tokenizer.json")))
    assert len(enc) == 7 and "[EMAIL]" in ct.tok.decode(enc.item(6).tolist())
    assert "exact duplicates removed 1" in capsys.readouterr().out


def test_missing_previous_steps_name_the_command(tmp_path, data_dir):
    p = run_script([SCRIPTS + "encode_stories.py", "--data_dir", str(data_dir)])
    assert_user_error(p, "download_tinystories.py")
    _write_raw(tmp_path / "bare", ["A story."])
    p = run_script([SCRIPTS + "encode_stories.py", "--data_dir", str(tmp_path / "bare")])
    assert_user_error(p, "train_tokenizer.py")
    p = run_script([SCRIPTS + "build_pretrain_bins.py", "--data_dir", str(data_dir)])
    assert_user_error(p, "encode_stories.py")


def test_empty_raw_input(data_dir):
    _write_raw(data_dir, [])
    p = run_script([SCRIPTS + "encode_stories.py", "--data_dir", str(data_dir)])
    assert_user_error(p, "holds no stories")


def test_bin_from_another_tokenizer_refused(data_dir):
    _write_raw(data_dir, generate_stories(5, seed=2))
    assert run_script([SCRIPTS + "encode_stories.py", "--data_dir", str(data_dir)]).returncode == 0
    shutil.rmtree(data_dir / "tokenizer")
    _train_tokenizer(data_dir / "tokenizer", 300, generate_stories(20, seed=3))
    p = run_script([SCRIPTS + "build_pretrain_bins.py", "--data_dir", str(data_dir)])
    assert_user_error(p, "another tokenizer")


@pytest.mark.parametrize("script, content, message", [
    ("build_sft_bins.py", None, "not found"),
    ("build_sft_bins.py", "", "is empty"),
    ("build_sft_bins.py", '[{"question": "q", "answer": "a"}]', "expected Alpaca"),
    ("build_sft_bins.py", '{"instruction": "i", "output": "o", "score": 3}\n', "unknown field 'score'"),
    ("build_sft_bins.py", '[{"instruction": "i", "output": "o"},', "not valid JSON"),
    ("build_preference_bins.py", '{"text": "t"}\n', "expected HH-RLHF"),
])
def test_bad_sft_and_preference_input(data_dir, script, content, message):
    path = data_dir / "input.json"
    if content is not None:
        path.write_text(content)
    p = run_script([SCRIPTS + script, "--data_dir", str(data_dir), "--input", str(path)])
    assert_user_error(p, message)


# ------------------------------------------------------------------------------ shared real data
def test_shared_alpaca_demo(shared_data, data_dir, ct, capsys):
    build_sft_bins.main(["--data_dir", str(data_dir), "--input", str(shared_data / "sft" / "alpaca_en_demo.json")])
    lay = DataLayout(data_dir)
    train, val = TokenBin(lay.sft("train"), "sft"), TokenBin(lay.sft("val"), "sft")
    assert train.sidecar.source["format"] == "alpaca"
    dropped = train.sidecar.stats["dropped"] + val.sidecar.stats["dropped"]
    assert len(train) + len(val) + dropped == 999 and len(val) == 50
    assert train.sidecar.stats["truncated"] > 0  # the 512-token limit bites on this data
    for i in range(len(train)):  # every sample, truncated or not, ends its targets with <|im_end|>
        a, b = train.span(i)
        last_target = a + int(np.flatnonzero(train.mask[a:b])[-1])
        assert train.tokens[last_target] == ct.im_end_id
    assert "build_sft_bins: " in capsys.readouterr().out


def test_shared_dpo_demo(shared_data, data_dir):
    build_preference_bins.main(["--data_dir", str(data_dir), "--max_seq_len", "1024",
                                "--input", str(shared_data / "preference" / "dpo_en_demo.json")])
    lay = DataLayout(data_dir)
    train, val = TokenBin(lay.preference("train"), "preference"), TokenBin(lay.preference("val"), "preference")
    assert train.sidecar.source["format"] == "conversations"
    assert len(train) + len(val) + train.sidecar.stats["dropped"] + val.sidecar.stats["dropped"] == 300


def test_shared_hh_rlhf_gz(shared_data, data_dir):
    build_preference_bins.main(["--data_dir", str(data_dir), "--input",
                                str(shared_data / "preference" / "hh_rlhf_harmless_base_test.jsonl.gz")])
    lay = DataLayout(data_dir)
    train = TokenBin(lay.preference("train"), "preference")
    val = TokenBin(lay.preference("val"), "preference")
    skipped = sum(train.sidecar.stats["input_skipped"].values())
    dropped = train.sidecar.stats["dropped"] + val.sidecar.stats["dropped"]
    assert train.sidecar.source["format"] == "hh"
    assert len(train) + len(val) + dropped + skipped == 2312 and skipped < 100
    ct = ChatTokenizer.wrap(Tokenizer.from_file(str(data_dir / "tokenizer" / "tokenizer.json")))
    prompt = ct.tok.decode(train.item(0, 0).tolist(), skip_special_tokens=False)
    assert prompt.startswith("<|im_start|>user\n") and prompt.endswith("<|im_start|>assistant\n")
    assert "Human:" not in prompt
    assert int(train.item(0, 1)[-1]) == ct.im_end_id == int(train.item(0, 2)[-1])
