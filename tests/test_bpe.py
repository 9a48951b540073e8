"""The hand-written byte-level BPE against HF `tokenizers` (the reference) and by hand."""
from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from data_pipeline.formats import EOS_TOKEN, SPECIAL_TOKENS
from data_pipeline.tokenizer import tokenizer_hash
from data_pipeline.tokenizer.bpe import BPETokenizer, train_bpe
from data_pipeline.tokenizer.byte_level import BYTE_TO_CHAR, count_words, from_byte_level, split_words, to_byte_level

SHARED_FILES = ("tinystoriesV2_train_first10k_lines.txt", "tinystories_v1_train_first2MiB.txt")


def hf_train(texts: list[str], vocab_size: int, special_tokens=SPECIAL_TOKENS, min_frequency: int = 0) -> Tokenizer:
    """The reference: HF's ByteLevel BPE trainer with the settings `bpe.py` documents."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=list(special_tokens),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return tok


def hf_merges(tok: Tokenizer) -> list[tuple[str, str]]:
    return [tuple(m) for m in json.loads(tok.to_str())["model"]["merges"]]


@pytest.fixture(scope="module")
def stories(shared_data) -> list[str]:
    """The shared TinyStories training text (~3.5 MB), one string per story."""
    out = []
    for name in SHARED_FILES:
        text = (shared_data / "tinystories" / name).read_text(encoding="utf-8")
        out += [s.strip("\n") for s in text.split(EOS_TOKEN) if s.strip()]
    return out


@pytest.fixture(scope="module")
def trained(stories) -> tuple[BPETokenizer, Tokenizer]:
    """Ours and HF's, both trained on the whole shared text at vocab 4096."""
    return train_bpe(stories, 4096, SPECIAL_TOKENS), hf_train(stories, 4096)


@pytest.fixture(scope="module")
def small(stories) -> BPETokenizer:
    """A quick tokenizer for property tests (first ~300 KB, vocab 1000)."""
    return train_bpe(stories[:350], 1000, SPECIAL_TOKENS)


@pytest.fixture(scope="module")
def small_hf(small) -> Tokenizer:
    """`small` as HF `tokenizers` reads it from our tokenizer.json."""
    return Tokenizer.from_str(json.dumps(small.to_hf_dict()))


# --------------------------------------------------------------------------- by hand
def test_byte_table_by_hand():
    assert len(set(BYTE_TO_CHAR.values())) == 256
    assert BYTE_TO_CHAR[ord("A")] == "A" and BYTE_TO_CHAR[ord(" ")] == "Ġ" and BYTE_TO_CHAR[ord("\n")] == "Ċ"
    assert BYTE_TO_CHAR[0] == "Ā" and BYTE_TO_CHAR[0xAD] == "\u0143"  # 68 non-printables take U+0100.. in order
    assert set(BYTE_TO_CHAR.values()) == set(pre_tokenizers.ByteLevel.alphabet())
    assert to_byte_level("é x") == "Ã©Ġx" and from_byte_level("Ã©Ġx") == "é x".encode()


def test_split_words_by_hand():
    assert split_words("Hi, you're  3 cats!\n") == ["Hi", ",", " you", "'re", " ", " 3", " cats", "!", "\n"]
    assert count_words(["a a", "a"]) == {"a": 2, " a": 1}


def test_overlapping_count_and_tie_break_by_hand():
    # "aaab": (a,a) occurs twice (overlapping) and (a,b) once, so (a,a) wins. Then "aa a b":
    # (aa,a) and (a,b) both occur once; the tie goes to the smaller id pair, (a,b), because
    # the new token "aa" has the largest id. Then (aa,ab).
    ours = train_bpe(["aaab"], 256 + 3)
    assert ours.merges == [("a", "a"), ("a", "b"), ("aa", "ab")]
    assert ours.vocab["aa"] == 256 and ours.vocab["aaab"] == 258
    assert ours.merges == hf_merges(hf_train(["aaab"], 256 + 3, special_tokens=[]))
    # all pairs once: the smallest (left id, right id) goes first; ids follow code points, "Ġ" is U+0120
    ours = train_bpe(["ba dc"], 256 + 4, ["<s>"])
    assert ours.merges[0] == ("b", "a") and ours.merges == hf_merges(hf_train(["ba dc"], 256 + 4, ["<s>"]))
    assert ours.vocab["<s>"] == 0 and ours.vocab["!"] == 1  # specials first, then bytes by code point


def test_encode_merge_order_by_hand():
    """Inside a word the lowest-rank merge goes first, leftmost among equals (as HF's BPE model)."""
    base = train_bpe([""], 256)
    vocab = dict(base.vocab)
    for tok in ("bc", "ab", "aa"):
        vocab[tok] = len(vocab)
    for merges, expect in (([("b", "c"), ("a", "b")], ["a", "bc"]), ([("a", "b"), ("b", "c")], ["ab", "c"])):
        ours = BPETokenizer(vocab, merges, {})
        assert [ours.id_to_token(i) for i in ours.encode("abc")] == expect
        assert Tokenizer.from_str(json.dumps(ours.to_hf_dict())).encode("abc").tokens == expect
    ours = BPETokenizer(vocab, [("a", "a")], {})
    assert [ours.id_to_token(i) for i in ours.encode("aaa")] == ["aa", "a"]  # left to right


# --------------------------------------------------------------------------- parity with HF
def test_trained_tokenizer_json_identical_to_hf(trained, stories, tmp_path):
    """Whole shared text (~3.5 MB), vocab 4096: same merges, vocab, ids and file as HF's trainer."""
    ours, hf = trained
    assert sum(len(s.encode()) for s in stories) > 3_000_000
    assert len(ours.merges) == 4096 - 256 - len(SPECIAL_TOKENS)
    assert ours.merges == hf_merges(hf)
    assert ours.to_hf_dict() == json.loads(hf.to_str())
    ours.save(tmp_path / "ours.json")
    hf.save(str(tmp_path / "hf.json"))
    assert (tmp_path / "ours.json").read_text(encoding="utf-8") == (tmp_path / "hf.json").read_text(encoding="utf-8")
    assert tokenizer_hash(tmp_path / "ours.json") == tokenizer_hash(tmp_path / "hf.json")


@pytest.mark.parametrize("n_stories,vocab_size,min_frequency,specials", [
    (400, 300, 0, SPECIAL_TOKENS), (400, 2000, 20, []), (1200, 8000, 2, SPECIAL_TOKENS),
])
def test_merges_identical_to_hf_other_settings(stories, n_stories, vocab_size, min_frequency, specials):
    texts = stories[-n_stories:]
    ours = train_bpe(texts, vocab_size, specials, min_frequency=min_frequency)
    assert ours.to_hf_dict()["model"] == json.loads(hf_train(texts, vocab_size, specials, min_frequency).to_str())["model"]


def test_saved_json_loaded_by_hf_encodes_every_line_like_ours(trained, stories, tmp_path):
    ours, _ = trained
    path = tmp_path / "tokenizer.json"
    ours.save(path)
    hf = Tokenizer.from_file(str(path))
    lines = [line for s in stories[:1000] for line in s.split("\n")]  # ~0.8 MB: HF's encoder is the slow part
    assert sum(map(len, lines)) > 700_000
    for line, enc in zip(lines, hf.encode_batch(lines)):
        assert enc.ids == ours.encode(line), line
    whole = "\n".join(stories[:300])
    assert hf.encode(whole).ids == ours.encode(whole)
    assert hf.decode(ours.encode(whole), skip_special_tokens=False) == whole


def test_save_load_round_trip(trained, tmp_path):
    ours, hf = trained
    ours.save(tmp_path / "tokenizer.json")
    back = BPETokenizer.from_file(tmp_path / "tokenizer.json")
    assert (back.vocab, back.merges, back.special_tokens) == (ours.vocab, ours.merges, ours.special_tokens)
    hf.save(str(tmp_path / "hf.json"))  # a file HF wrote reads the same
    assert BPETokenizer.from_file(tmp_path / "hf.json").merges == ours.merges
    with pytest.raises(ValueError, match="byte-level BPE"):
        doc = ours.to_hf_dict()
        doc["pre_tokenizer"] = None
        (tmp_path / "bad.json").write_text(json.dumps(doc))
        BPETokenizer.from_file(tmp_path / "bad.json")


def test_special_tokens_never_split(trained):
    ours, hf = trained
    text = "a<|im_start|>user\nhi<|im_end|><|endoftext|><|pad|>x<|endoftext|<|im_end|>"
    ids = ours.encode(text)
    assert ids == hf.encode(text).ids
    for t in SPECIAL_TOKENS:
        assert ours.encode(t) == [ours.special_tokens[t]] == [SPECIAL_TOKENS.index(t)]
        assert ids.count(ours.special_tokens[t]) == text.count(t)
    assert ours.decode(ids) == text
    assert ours.decode(ids, skip_special_tokens=True) == "auser\nhix<|endoftext|"
    assert ours.encode_ordinary("<|pad|>") != [ours.special_tokens["<|pad|>"]]


# --------------------------------------------------------------------------- properties
special_text = st.lists(st.one_of(st.text(), st.sampled_from(SPECIAL_TOKENS + ["<|", "|>", "😀🎉", "é\u0301", "\r\n  \t"])))


@settings(max_examples=200, deadline=None)
@given(special_text.map("".join))
def test_round_trip_arbitrary_unicode(small, text):
    assert small.decode(small.encode(text)) == text


# Code points assigned after Unicode 14 are left out: HF's regex engine does not know
# them yet (see byte_level.py); hypothesis draws from Python's Unicode tables.
assigned_text = st.text(st.characters(exclude_categories=("Cs", "Cn")))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(assigned_text, st.sampled_from(SPECIAL_TOKENS))).map("".join))
def test_encoding_matches_hf_on_arbitrary_text(small, small_hf, text):
    assert small.encode(text) == small_hf.encode(text).ids
    assert [w for w, _ in pre_tokenizers.ByteLevel(add_prefix_space=False).pre_tokenize_str(text.replace("<|", ""))] \
        == [to_byte_level(w) for w in split_words(text.replace("<|", ""))]


small_alphabet_corpus = st.lists(st.text(st.sampled_from("aab é😀\n"), max_size=40), min_size=1, max_size=12)


@settings(max_examples=150, deadline=None)
@given(small_alphabet_corpus, st.integers(257, 330))
def test_merges_identical_to_hf_on_random_corpora(texts, vocab_size):
    """Few distinct symbols make many ties and overlaps (``aaa``): the hardest case for parity."""
    ours = train_bpe(texts, vocab_size, ["<s>"])
    assert ours.to_hf_dict()["model"] == json.loads(hf_train(texts, vocab_size, ["<s>"]).to_str())["model"]


def test_parallel_word_counting_matches(stories):
    assert count_words(stories[:200], num_workers=2) == count_words(stories[:200])
