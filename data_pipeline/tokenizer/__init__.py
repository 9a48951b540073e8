"""Tokenizers: the hand-written byte-level BPE, training backends, and the tokenizer directory.

Other steps use `load_tokenizer(dir)` (a `tokenizers.Tokenizer` plus the special-token ids)
and `tokenizer_hash(path)` (sha256 of the canonical tokenizer.json) from here.
"""
from data_pipeline.tokenizer.io import LoadedTokenizer, load_tokenizer, tokenizer_hash

__all__ = ["LoadedTokenizer", "load_tokenizer", "tokenizer_hash"]
