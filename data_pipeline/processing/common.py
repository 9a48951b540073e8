"""Plumbing shared by the processing scripts: data dir, tokenizer, input records, split, summary."""
from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path
from typing import Any

import numpy as np

from data_pipeline.chat import ChatTokenizer, Message
from data_pipeline.formats import COMMANDS, DataLayout, file_sha256, sidecar_path
from data_pipeline.tokenizer.io import load_tokenizer as load_tokenizer_dir
from data_pipeline.tokenizer.io import tokenizer_hash
from utils.errors import UserError
from utils.paths import DEFAULT_DATA_DIR, resolve_path
from utils.progress import progress as progress_bar


def add_data_dir_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data_dir", default=str(DEFAULT_DATA_DIR),
                        help="data directory every step reads from and writes to (default: data/)")


def add_chat_bin_args(parser: argparse.ArgumentParser, input_help: str, max_len_help: str, item: str) -> None:
    """Options shared by the SFT and preference bin builders."""
    add_data_dir_arg(parser)
    parser.add_argument("--input", default=None, help=input_help)
    parser.add_argument("--max_seq_len", type=int, default=512, help=max_len_help)
    parser.add_argument("--val_fraction", type=float, default=0.05, help=f"fraction of {item} held out (default 0.05)")
    parser.add_argument("--seed", type=int, default=1337, help="seed of the train/val split and the built-in data")


def check_max_seq_len(max_seq_len: int) -> None:
    if max_seq_len < 8:
        raise UserError(f"--max_seq_len must be at least 8, got {max_seq_len}")


def layout_from(args: argparse.Namespace) -> DataLayout:
    """The data layout of `--data_dir` (relative paths: from the repo root, like every script)."""
    return DataLayout(resolve_path(args.data_dir))


def load_tokenizer(layout: DataLayout) -> tuple[ChatTokenizer, str]:
    """The data dir's tokenizer and its hash; missing or unreadable → UserError naming the fix."""
    path = layout.tokenizer_dir / "tokenizer.json"
    if not path.exists():
        raise UserError(f"no tokenizer at {path}: run `{COMMANDS['tokenizer']}` first")
    try:
        loaded = load_tokenizer_dir(layout.tokenizer_dir)
    except UserError:
        raise
    except Exception as e:  # `tokenizers` raises plain Exceptions for unreadable files
        raise UserError(f"{path} is not a valid tokenizer file ({str(e).splitlines()[0]}); "
                        f"rerun `{COMMANDS['tokenizer']}`") from None
    return ChatTokenizer.wrap(loaded.tokenizer), tokenizer_hash(layout.tokenizer_dir)


def source_entry(layout: DataLayout, base: Path) -> dict[str, Any]:
    """How a sidecar names an input bin: its path in the data dir + the hash of its sidecar."""
    side = sidecar_path(base)
    return {"path": str(base.relative_to(layout.root)), "sidecar_sha256": file_sha256(side)}


def read_records(path: Path) -> list[dict]:
    """Records from a JSON array or JSON Lines file (optionally gzip-compressed)."""
    if not path.exists():
        raise UserError(f"input file {path} not found")
    with open(path, "rb") as f:
        gz = f.read(2) == b"\x1f\x8b"
    try:
        with (gzip.open(path, "rt", encoding="utf-8") if gz else open(path, encoding="utf-8")) as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {path}: {e}") from None
    if not text.strip():
        raise UserError(f"input file {path} is empty")
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: not valid JSON (line {e.lineno}: {e.msg})") from None
    else:
        records = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise UserError(f"{path}:{lineno}: not valid JSON Lines ({e.msg})") from None
    if not records:
        raise UserError(f"input file {path} holds no records")
    for i, r in enumerate(records):
        if not isinstance(r, dict):
            raise UserError(f"{path}: record {i} is a {type(r).__name__}, expected a JSON object")
    return records


def check_fields(record: dict, i: int, fmt: str, required: set[str], optional: set[str]) -> None:
    """Unknown or missing fields in record `i` of format `fmt` → UserError listing the allowed ones."""
    allowed = required | optional
    for k in record:
        if k not in allowed:
            raise UserError(f"record {i}: unknown field {k!r} for the {fmt} format "
                            f"(allowed: {', '.join(sorted(allowed))})")
    for k in sorted(required):
        if k not in record:
            raise UserError(f"record {i}: missing field {k!r} of the {fmt} format")


SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system"}


def text_field(value: object, i: int, what: str) -> str:
    """`value` if it is a string, else UserError naming record `i` and the field."""
    if not isinstance(value, str):
        raise UserError(f"record {i}: {what} must be a string, got {type(value).__name__}")
    return value


def sharegpt_messages(turns: object, i: int) -> list[Message]:
    """ShareGPT turns [{"from", "value"}] as chat messages."""
    if not isinstance(turns, list):
        raise UserError(f"record {i}: conversations must be a list of {{from, value}} turns")
    out = []
    for j, t in enumerate(turns):
        if not isinstance(t, dict) or set(t) != {"from", "value"}:
            raise UserError(f"record {i}: turn {j} must be an object with exactly the fields from, value")
        if t["from"] not in SHAREGPT_ROLES:
            raise UserError(f"record {i}: turn {j} has unknown speaker {t['from']!r} "
                            f"(allowed: {', '.join(SHAREGPT_ROLES)})")
        out.append({"role": SHAREGPT_ROLES[t["from"]], "content": text_field(t["value"], i, f"turn {j} value")})
    return out


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic split of items 0..n-1 into sorted (train, val) index arrays.

    The val set is the first round(n * val_fraction) items of a seeded permutation (at least
    one when val_fraction > 0), and train keeps at least one item.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise UserError(f"--val_fraction must be in [0, 1), got {val_fraction}")
    n_val = int(round(n * val_fraction))
    if val_fraction > 0:
        n_val = max(n_val, 1)
    if n - n_val < 1:
        raise UserError(f"only {n} items: too few to split off {n_val} for validation")
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def progress(total: int, desc: str, unit: str = "it") -> Any:
    """A progress bar on stderr: a bar on a terminal, a line every 30 s in a log (`utils.progress`)."""
    return progress_bar(total=total, desc=desc, unit=unit, unit_scale=True, leave=False)


def summary(step: str, items: int, item_name: str, tokens: int, nbytes: int, seconds: float,
            extra: str = "") -> None:
    """The one-line summary every step prints."""
    line = (f"{step}: {items:,} {item_name}, {tokens:,} tokens, {nbytes:,} bytes in {seconds:.1f} s"
            f" ({tokens / max(seconds, 1e-9):,.0f} tokens/s)")
    print(line + (f"; {extra}" if extra else ""), flush=True)
