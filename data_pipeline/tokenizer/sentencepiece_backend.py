"""The sentencepiece backend: train a BPE sentencepiece model and convert it to `tokenizer.json`.

SentencePiece (Kudo & Richardson 2018) trains BPE on raw text where spaces are the
character ``▁``; with byte_fallback a character missing from the vocabulary is spelled by
its UTF-8 bytes ``<0x..>``, so nothing becomes unknown.

The conversion is written here because HF's own converter needs `protobuf`: the
`sentencepiece` processor gives every piece and its kind, and the BPE merges are read off
the vocabulary the way HF's `SpmConverter` does it (every split ``left + right`` of a piece
into two pieces, ranked by the piece's id, then by the ids of left and right). The result
is a `tokenizers` BPE with byte_fallback, a Metaspace pre-tokenizer (split before each
``▁``, no prefix space) and a decoder that maps ``▁`` back to spaces and fuses bytes.
The original model is kept beside it as ``tokenizer.model``. On TinyStories text the
converted tokenizer encodes every line exactly as sentencepiece does (tested); as in sentencepiece,
a literal ``▁`` in the input decodes as a space.
"""
from __future__ import annotations

import io
from typing import Iterable, Sequence

import sentencepiece as spm
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

UNK_PIECE = "<unk>"


def train_sentencepiece(lines: Iterable[str], vocab_size: int, special_tokens: Sequence[str]) -> bytes:
    """Train a BPE sentencepiece model on `lines`; returns the serialized model.

    Ids: the special tokens first (0..k-1, as user-defined symbols), then ``<unk>``, then
    the 256 byte pieces, then merges and characters. Text is kept as is (identity
    normalization, no dummy prefix, no whitespace cleanup) so it round-trips. Raises
    RuntimeError (from sentencepiece) when the vocabulary cannot be built.
    """
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        hard_vocab_limit=False,  # a small corpus yields a smaller vocabulary instead of an error
        byte_fallback=True,
        character_coverage=1.0,
        user_defined_symbols=list(special_tokens),
        unk_id=len(special_tokens),
        bos_id=-1,
        eos_id=-1,
        pad_id=-1,
        normalization_rule_name="identity",
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        num_threads=2,
        minloglevel=2,
    )
    return model.getvalue()


def sentencepiece_to_hf(model_proto: bytes, special_tokens: Sequence[str]) -> Tokenizer:
    """Build the equivalent `tokenizers.Tokenizer` (BPE + byte_fallback) from a sentencepiece model."""
    sp = spm.SentencePieceProcessor(model_proto=model_proto)
    pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    vocab = {p: i for i, p in enumerate(pieces)}
    normal = {
        p for i, p in enumerate(pieces)
        if not (sp.is_byte(i) or sp.is_control(i) or sp.is_unknown(i) or p in special_tokens)
    }
    merges: list[tuple[str, str]] = []
    for piece in pieces:  # id order = sentencepiece's merge order
        if piece not in normal:
            continue
        splits = [(piece[:k], piece[k:]) for k in range(1, len(piece))]
        splits = [(a, b) for a, b in splits if a in normal and b in normal]
        merges.extend(sorted(splits, key=lambda ab: (vocab[ab[0]], vocab[ab[1]])))

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=UNK_PIECE, fuse_unk=True, byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special_tokens])
    return tok
