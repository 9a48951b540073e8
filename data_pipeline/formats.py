"""The one module that owns the project's on-disk data formats and the chat template.

Everything that writes or reads tokenizer directories, token bins and their JSON sidecars
goes through here, so a format is defined once: the data directory layout (`DataLayout`),
the token-bin files (`TokenBinWriter` / `TokenBin`) and their JSON sidecar (`BinSidecar`),
which loaders check against the tokenizer and model before use. The bin layout follows
nanoGPT's flat `uint16` token files, extended with offsets, loss masks and a sidecar.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError

from utils.errors import UserError

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS: list[str] = [EOS_TOKEN, PAD_TOKEN, IM_START, IM_END]

# The one chat template (ChatML). SFT data, preference data, chat CLI and server all use it.
# Rendered text of a conversation:
#   <|im_start|>system\n...<|im_end|>\n<|im_start|>user\n...<|im_end|>\n<|im_start|>assistant\n...<|im_end|>\n
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# ---------------------------------------------------------------------------- data directory layout
# The command that makes each artifact: error messages name it when the artifact is missing.
COMMANDS: dict[str, str] = {
    "raw": "python data_pipeline/download/download_tinystories.py",
    "tokenizer": "python data_pipeline/tokenizer/train_tokenizer.py --vocab_size 4096 --data_limit_mb 100",
    "encoded": "python data_pipeline/processing/encode_stories.py",
    "pretrain": "python data_pipeline/processing/build_pretrain_bins.py",
    "sft": "python data_pipeline/processing/build_sft_bins.py",
    "preference": "python data_pipeline/processing/build_preference_bins.py",
}
SPLITS = ("train", "val")


@dataclass(frozen=True)
class DataLayout:
    """Where every artifact lives under one data directory (default `data/`).

        raw/tinystories.txt + raw/tinystories.json      stories separated by `<|endoftext|>` lines
        tokenizer/tokenizer.json, tokenizer_config.json  HF tokenizer + chat template
        encoded/stories.{bin,idx,json}                   every story, EOS appended, + offsets
        pretrain/{train,val}.{bin,json}                  flat token stream, EOS between documents
        sft/{train,val}.{bin,mask,idx,json}              chat tokens + loss mask + sample offsets
        preference/{train,val}.{bin,idx,json}            prompt / chosen / rejected ids + offsets
    """

    root: Path

    @property
    def raw_stories(self) -> Path:
        return self.root / "raw" / "tinystories.txt"

    @property
    def raw_stories_sidecar(self) -> Path:
        return self.root / "raw" / "tinystories.json"

    @property
    def tokenizer_dir(self) -> Path:
        return self.root / "tokenizer"

    @property
    def encoded_stories(self) -> Path:
        return self.root / "encoded" / "stories"

    def pretrain(self, split: str) -> Path:
        return self.root / "pretrain" / split

    def sft(self, split: str) -> Path:
        return self.root / "sft" / split

    def preference(self, split: str) -> Path:
        return self.root / "preference" / split


# ---------------------------------------------------------------------------- token bins
# A token bin is a base path `<dir>/<name>` with up to four files beside each other:
#   <name>.bin   the tokens, one flat little-endian array (uint16 when vocab < 65536, else uint32)
#   <name>.idx   int64 offsets into .bin: item i, part j spans [idx[i*P + j], idx[i*P + j + 1])
#                (P parts per item: 1 for documents and SFT samples, 3 for prompt/chosen/rejected)
#   <name>.mask  uint8, one per token: 1 where the token is a training target (SFT only)
#   <name>.json  the sidecar (`BinSidecar`), written last: a bin without one is incomplete
BIN_FORMAT = "llm-from-scratch/token-bin"
BIN_VERSION = 1
BinKind = Literal["encoded", "pretrain", "sft", "preference"]


def token_dtype(vocab_size: int) -> str:
    """The smallest dtype that holds every token id."""
    return "uint16" if vocab_size < 2**16 else "uint32"


class BinSidecar(BaseModel):
    """The JSON sidecar: what a bin holds and what it was made from."""

    model_config = ConfigDict(extra="forbid")

    format: Literal["llm-from-scratch/token-bin"] = BIN_FORMAT
    version: int = BIN_VERSION
    kind: BinKind
    dtype: Literal["uint16", "uint32"]
    vocab_size: int
    tokenizer_hash: str
    eos_id: int
    pad_id: int
    num_tokens: int
    num_items: int                  # documents, SFT samples or preference pairs
    parts_per_item: int = 1
    has_offsets: bool = True
    has_mask: bool = False
    created_by: str                 # the command that made it
    source: dict[str, Any]          # inputs: paths, their sidecar hashes, options
    stats: dict[str, Any] = {}      # counts worth reporting (truncated, dropped, ...)


def _suffixed(base: Path, suffix: str) -> Path:
    return base.with_name(base.name + suffix)


def sidecar_path(base: Path) -> Path:
    return _suffixed(Path(base), ".json")


def bin_nbytes(base: Path) -> int:
    """Bytes on disk of a token bin's data files (.bin, .idx, .mask)."""
    files = (_suffixed(Path(base), s) for s in (".bin", ".idx", ".mask"))
    return sum(f.stat().st_size for f in files if f.exists())


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON to a temp file beside `path`, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def read_sidecar(base: Path, kind: BinKind) -> BinSidecar:
    """Read and validate the sidecar of bin `base`; missing or foreign → UserError naming the fix."""
    path = sidecar_path(base)
    if not path.exists():
        raise UserError(f"{path} not found: run `{COMMANDS[kind]}` first")
    try:
        sc = BinSidecar.model_validate_json(path.read_text(encoding="utf-8"))
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(top level)"
        raise UserError(f"{path} is not a valid token-bin sidecar ({where}: {first['msg']}); "
                        f"rebuild it with `{COMMANDS[kind]}`") from None
    if sc.kind != kind:
        raise UserError(f"{path} describes a '{sc.kind}' bin, expected '{kind}'")
    if sc.version != BIN_VERSION:
        raise UserError(f"{path} has format version {sc.version}, this code reads {BIN_VERSION}; "
                        f"rebuild it with `{COMMANDS[kind]}`")
    return sc


def check_compatible(sc: BinSidecar, where: Path, vocab_size: Optional[int] = None,
                     tokenizer_hash: Optional[str] = None) -> None:
    """Refuse a bin made for another tokenizer or model (UserError)."""
    if vocab_size is not None and sc.vocab_size > vocab_size:
        raise UserError(f"{where} was built with vocab_size {sc.vocab_size} but the model has "
                        f"vocab_size {vocab_size}: token ids would be out of range")
    if tokenizer_hash is not None and sc.tokenizer_hash != tokenizer_hash:
        raise UserError(f"{where} was built with another tokenizer (hash {sc.tokenizer_hash[:12]}, "
                        f"expected {tokenizer_hash[:12]}); rebuild it with `{COMMANDS[sc.kind]}`")


class TokenBinWriter:
    """Streams items into a token bin; files appear atomically (temp + rename) on `close`.

    Use it as a context manager: leaving the block without `close` (an error) removes the
    temp files and leaves any previous bin untouched.
    """

    _FLUSH_TOKENS = 1 << 20

    def __init__(self, base: Path, dtype: str, parts_per_item: int = 1, with_offsets: bool = True,
                 with_mask: bool = False) -> None:
        self.base = Path(base)
        self.base.parent.mkdir(parents=True, exist_ok=True)
        self.dtype = np.dtype(dtype).newbyteorder("<")
        self.parts_per_item = parts_per_item
        self.with_offsets = with_offsets
        self.with_mask = with_mask
        self._tok_f = open(_suffixed(self.base, ".bin.tmp"), "wb")
        self._mask_f = open(_suffixed(self.base, ".mask.tmp"), "wb") if with_mask else None
        self._offsets: list[int] = [0]
        self._buf: list[np.ndarray] = []
        self._mask_buf: list[np.ndarray] = []
        self._buffered = 0
        self.num_tokens = 0
        self.num_items = 0
        self._closed = False

    def __enter__(self) -> "TokenBinWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._closed:
            self._tok_f.close()
            if self._mask_f is not None:
                self._mask_f.close()
            for suffix in (".bin.tmp", ".mask.tmp"):
                _suffixed(self.base, suffix).unlink(missing_ok=True)

    def add(self, parts: Sequence[Sequence[int] | np.ndarray], mask: Optional[Sequence[int]] = None) -> None:
        """Append one item made of `parts_per_item` token sequences (and its loss mask)."""
        if len(parts) != self.parts_per_item:
            raise ValueError(f"expected {self.parts_per_item} parts, got {len(parts)}")
        n_item = 0
        for p in parts:
            arr = np.asarray(p, dtype=self.dtype)
            self._buf.append(arr)
            n_item += len(arr)
            self.num_tokens += len(arr)
            self._offsets.append(self.num_tokens)
        if self.with_mask:
            m = np.asarray(mask, dtype=np.uint8)
            if len(m) != n_item:
                raise ValueError(f"mask has {len(m)} entries for {n_item} tokens")
            self._mask_buf.append(m)
        self.num_items += 1
        self._buffered += n_item
        if self._buffered >= self._FLUSH_TOKENS:
            self._flush()

    def extend(self, tokens: np.ndarray, num_items: int) -> None:
        """Append `num_items` whole items already joined into one array (bins without offsets)."""
        if self.with_offsets or self.with_mask:
            raise ValueError("extend() is for plain token streams (no offsets, no mask)")
        self._buf.append(np.asarray(tokens, dtype=self.dtype))
        self.num_tokens += len(tokens)
        self.num_items += num_items
        self._buffered += len(tokens)
        if self._buffered >= self._FLUSH_TOKENS:
            self._flush()

    def _flush(self) -> None:
        if self._buf:
            np.concatenate(self._buf).tofile(self._tok_f)
        if self._mask_f is not None and self._mask_buf:
            np.concatenate(self._mask_buf).tofile(self._mask_f)
        self._buf, self._mask_buf, self._buffered = [], [], 0

    def close(self, **sidecar_fields: Any) -> BinSidecar:
        """Finish the files and write the sidecar (dtype, counts and layout are filled in here)."""
        self._flush()
        self._tok_f.close()
        if self._mask_f is not None:
            self._mask_f.close()
        sc = BinSidecar(dtype=self.dtype.name, num_tokens=self.num_tokens, num_items=self.num_items,
                        parts_per_item=self.parts_per_item, has_offsets=self.with_offsets,
                        has_mask=self.with_mask, **sidecar_fields)
        side = sidecar_path(self.base)
        side.unlink(missing_ok=True)  # no stale sidecar may describe half-replaced files
        os.replace(_suffixed(self.base, ".bin.tmp"), _suffixed(self.base, ".bin"))
        if self.with_mask:
            os.replace(_suffixed(self.base, ".mask.tmp"), _suffixed(self.base, ".mask"))
        if self.with_offsets:
            idx_tmp = _suffixed(self.base, ".idx.tmp")
            np.asarray(self._offsets, dtype="<i8").tofile(idx_tmp)
            os.replace(idx_tmp, _suffixed(self.base, ".idx"))
        write_json_atomic(side, sc.model_dump())
        self._closed = True
        return sc


class TokenBin:
    """A token bin opened for reading: tokens (and mask) memory-mapped, offsets in memory."""

    def __init__(self, base: Path, kind: BinKind, vocab_size: Optional[int] = None,
                 tokenizer_hash: Optional[str] = None) -> None:
        self.base = Path(base)
        self.sidecar = sc = read_sidecar(self.base, kind)
        check_compatible(sc, sidecar_path(self.base), vocab_size, tokenizer_hash)
        dtype = np.dtype(sc.dtype).newbyteorder("<")
        self.tokens = self._map(".bin", dtype, sc.num_tokens)
        self.mask = self._map(".mask", np.dtype(np.uint8), sc.num_tokens) if sc.has_mask else None
        self.offsets: Optional[np.ndarray] = None
        if sc.has_offsets:
            n_off = sc.num_items * sc.parts_per_item + 1
            self.offsets = np.array(self._map(".idx", np.dtype("<i8"), n_off), dtype=np.int64)
            if self.offsets[-1] != sc.num_tokens:
                self._corrupt(".idx", "its last offset is not the token count")

    def _corrupt(self, suffix: str, why: str) -> None:
        raise UserError(f"{_suffixed(self.base, suffix)} does not match its sidecar ({why}); "
                        f"rebuild it with `{COMMANDS[self.sidecar.kind]}`")

    def _map(self, suffix: str, dtype: np.dtype, count: int) -> np.ndarray:
        path = _suffixed(self.base, suffix)
        if not path.exists():
            self._corrupt(suffix, "file missing")
        size = path.stat().st_size
        if size != count * dtype.itemsize:
            self._corrupt(suffix, f"{size} bytes, expected {count * dtype.itemsize}")
        if count == 0:
            return np.zeros(0, dtype=dtype)
        return np.memmap(path, dtype=dtype, mode="r", shape=(count,))

    def __len__(self) -> int:
        return self.sidecar.num_items

    def span(self, i: int, part: int = 0) -> tuple[int, int]:
        """[start, end) token range of part `part` of item `i`."""
        j = i * self.sidecar.parts_per_item + part
        return int(self.offsets[j]), int(self.offsets[j + 1])

    def item(self, i: int, part: int = 0) -> np.ndarray:
        a, b = self.span(i, part)
        return self.tokens[a:b]

    def item_lengths(self) -> np.ndarray:
        """Total tokens of each item (all parts together), shape (num_items,)."""
        per_item = self.offsets[:: self.sidecar.parts_per_item]
        return np.diff(per_item)


def bin_base(path: Path) -> Path:
    """``.../train.bin`` → ``.../train`` (token bins are named by their base path)."""
    return path.with_suffix("") if path.suffix == ".bin" else path
