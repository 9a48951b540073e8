"""The tokenizer directory on disk: write it, hash it, load it.

A tokenizer directory (``<data_dir>/tokenizer/``) holds

    tokenizer.json           HF `tokenizers` file (model, pre-tokenizer, decoder, special tokens)
    tokenizer_config.json    for `transformers.AutoTokenizer`: eos/pad tokens, no bos, chat_template
    special_tokens_map.json  the same special tokens, for older readers
    tokenizer_meta.json      how it was made: backend, vocab size, corpus, seconds, tokenizer hash
    tokenizer.model          (sentencepiece backend only) the original sentencepiece model

Other steps import `load_tokenizer` and `tokenizer_hash` from here; the hash of the
canonical ``tokenizer.json`` content is what token bins record so a loader can check that
bins and tokenizer belong together.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import NamedTuple

from tokenizers import Tokenizer

from data_pipeline.formats import CHAT_TEMPLATE, COMMANDS, EOS_TOKEN, PAD_TOKEN, SPECIAL_TOKENS
from utils.errors import UserError

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
META_FILE = "tokenizer_meta.json"
SPM_MODEL_FILE = "tokenizer.model"
DEFAULT_MODEL_MAX_LENGTH = 2048


class LoadedTokenizer(NamedTuple):
    """A `tokenizers.Tokenizer` and the ids of the project's special tokens (unpacks as a pair)."""

    tokenizer: Tokenizer
    special_ids: dict[str, int]  # token text → id, for every token in formats.SPECIAL_TOKENS

    @property
    def eos_id(self) -> int:
        return self.special_ids[EOS_TOKEN]

    @property
    def pad_id(self) -> int:
        return self.special_ids[PAD_TOKEN]


def _tokenizer_file(path: str | os.PathLike) -> Path:
    p = Path(path)
    return p / TOKENIZER_FILE if p.is_dir() else p


def tokenizer_hash(path: str | os.PathLike) -> str:
    """sha256 (hex) of the canonical content of ``tokenizer.json`` (`path`: the file or its dir).

    Canonical = parsed and re-serialized with sorted keys and no whitespace, so the hash
    depends on what the tokenizer does, not on indentation or key order.
    """
    file = _tokenizer_file(path)
    if not file.is_file():
        raise UserError(f"no tokenizer at {file}; run python data_pipeline/tokenizer/train_tokenizer.py first")
    try:
        doc = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{file} is not a tokenizer.json ({e}); rerun train_tokenizer.py") from None
    canonical = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def load_tokenizer(tokenizer_dir: str | os.PathLike) -> LoadedTokenizer:
    """Load ``<dir>/tokenizer.json`` and look up the special tokens' ids (each must exist)."""
    file = _tokenizer_file(tokenizer_dir)
    if not file.is_file():
        raise UserError(f"no tokenizer at {file}; run python data_pipeline/tokenizer/train_tokenizer.py first")
    try:
        tok = Tokenizer.from_file(str(file))
    except Exception as e:  # `tokenizers` raises plain Exceptions for unreadable files
        raise UserError(f"{file} is not a valid tokenizer.json ({str(e).splitlines()[0]}); "
                        "rerun python data_pipeline/tokenizer/train_tokenizer.py") from None
    special_ids: dict[str, int] = {}
    for t in SPECIAL_TOKENS:
        i = tok.token_to_id(t)
        if i is None:
            raise UserError(f"{file} lacks the special token {t!r}; retrain it with train_tokenizer.py")
        special_ids[t] = i
    return LoadedTokenizer(tok, special_ids)


def _write_json_atomic(path: Path, obj: object) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def write_hf_configs(out_dir: Path, model_max_length: int = DEFAULT_MODEL_MAX_LENGTH) -> None:
    """Write tokenizer_config.json + special_tokens_map.json so `AutoTokenizer` loads `out_dir`."""
    extra = [t for t in SPECIAL_TOKENS if t not in (EOS_TOKEN, PAD_TOKEN)]
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "unk_token": None,
        "additional_special_tokens": extra,
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    _write_json_atomic(out_dir / CONFIG_FILE, config)
    _write_json_atomic(out_dir / SPECIAL_TOKENS_MAP_FILE,
                       {"eos_token": EOS_TOKEN, "pad_token": PAD_TOKEN, "additional_special_tokens": extra})


def write_meta(out_dir: Path, meta: dict) -> None:
    """Write the ``tokenizer_meta.json`` sidecar."""
    _write_json_atomic(out_dir / META_FILE, meta)



def required_tokenizer_hash(tokenizer_dir: Path) -> str:
    """The hash of the tokenizer a training stage uses, for the data sidecar check
    (UserError naming the command to run when it is missing)."""
    if not (tokenizer_dir / "tokenizer.json").is_file():
        raise UserError(f"no tokenizer at {tokenizer_dir} (tokenizer.json): run `{COMMANDS['tokenizer']}` "
                        "or set data.tokenizer_dir")
    return tokenizer_hash(tokenizer_dir)
