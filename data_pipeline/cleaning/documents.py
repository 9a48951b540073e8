"""Read and write document files: texts separated by a line holding only `<|endoftext|>`.

This is the raw-text format of the pipeline (`<data_dir>/raw/tinystories.txt`, the input and
output of the cleaning scripts), the same layout as the TinyStories release files.
"""
from __future__ import annotations

import os
from pathlib import Path

from data_pipeline.formats import EOS_TOKEN
from utils.errors import UserError


def split_documents(text: str) -> list[str]:
    """Documents of a text in which `<|endoftext|>` ends each document (stripped, empties dropped)."""
    return [d.strip() for d in text.split(EOS_TOKEN) if d.strip()]


def read_documents(path: str | os.PathLike, require_separator: bool = True) -> list[str]:
    """All documents of a `<|endoftext|>`-separated UTF-8 file.

    Raises UserError for a missing, unreadable, non-UTF-8 or empty file, and (unless
    `require_separator` is False) for a file without a single `<|endoftext|>`: that is
    almost always a file in another format.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"input file {path} not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text (byte {e.start}): expected documents separated by "
                        f"lines '{EOS_TOKEN}'") from None
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from None
    if not text.strip():
        raise UserError(f"{path} is empty")
    if require_separator and EOS_TOKEN not in text:
        raise UserError(f"{path} has no '{EOS_TOKEN}' separator: expected documents separated by lines "
                        f"'{EOS_TOKEN}'")
    docs = split_documents(text)
    if not docs:
        raise UserError(f"{path} holds only '{EOS_TOKEN}' separators and no text")
    return docs


def format_documents(docs: list[str]) -> str:
    """The file text for `docs`: each document followed by a line `<|endoftext|>`."""
    for i, d in enumerate(docs):
        if EOS_TOKEN in d:
            raise ValueError(f"document {i} contains the separator {EOS_TOKEN!r}")
    return "".join(f"{d.strip()}\n{EOS_TOKEN}\n" for d in docs)


def write_documents(path: str | os.PathLike, docs: list[str]) -> int:
    """Write `docs` atomically (temp file + rename); returns the number of bytes written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = format_documents(docs).encode("utf-8")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return len(data)
