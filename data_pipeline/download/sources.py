"""Where the download steps get their data: the Hugging Face hub, a local file, or the built-in corpus.

The hub is tried only after a quick probe (a few seconds at most): unreachable or offline
(HF_HUB_OFFLINE / HF_DATASETS_OFFLINE), the scripts fall back to the built-in corpus with a
WARNING line saying why, or stop with exit code 2 under --no_fallback. Without the probe,
`datasets` retries for half a minute before it gives up.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
import urllib.error
import urllib.request
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Optional


from utils.errors import UserError
from utils.paths import DEFAULT_DATA_DIR
from utils.progress import progress

SOURCES = ("hub", "local", "builtin")
HUB_TIMEOUT_S = 5.0


def add_source_args(p: argparse.ArgumentParser, what: str) -> None:
    """The options both download scripts share."""
    p.add_argument("--data_dir", default=str(DEFAULT_DATA_DIR),
                   help="data directory (default: data/ in the repo; a relative path is taken from the repo root)")
    p.add_argument("--source", choices=SOURCES, default="hub",
                   help=f"hub: stream {what} from the Hugging Face hub; local: read --input; builtin: generate")
    p.add_argument("--input", help="local file for --source local")
    p.add_argument("--no_fallback", action="store_true",
                   help="fail (exit 2) instead of falling back to the built-in corpus when the hub is unreachable")
    p.add_argument("--seed", type=int, default=0, help="seed of the built-in generator")
    p.add_argument("--timeout", type=float, default=HUB_TIMEOUT_S, help="seconds to wait for the hub")


def check_source_args(args: argparse.Namespace, input_format: str) -> None:
    """UserError for option combinations that cannot work."""
    if args.source == "local" and not args.input:
        raise UserError(f"--source local needs --input FILE ({input_format})")
    if args.input and args.source != "local":
        raise UserError(f"--input is only used with --source local (got --source {args.source})")
    if args.timeout <= 0:
        raise UserError(f"--timeout must be > 0 seconds, got {args.timeout}")


def offline_reason() -> Optional[str]:
    """Why the hub must not be contacted (an offline variable is set), or None."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return f"{var} is set"
    return None


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def probe_hub(repo_id: str, timeout: float) -> Optional[str]:
    """None when the hub answers within `timeout` seconds, else the reason it cannot be used."""
    reason = offline_reason()
    if reason:
        return reason
    url = f"{hub_endpoint()}/api/datasets/{repo_id}"
    try:
        urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout).close()
    except urllib.error.HTTPError:
        return None  # the server answered; access problems are reported by `datasets` itself
    except (urllib.error.URLError, OSError, ValueError) as e:
        why = getattr(e, "reason", e)
        return f"cannot reach {hub_endpoint()} ({why})"
    return None


def stream_hub(repo_id: str, config: Optional[str], split: str, limit: Optional[int], timeout: float,
               desc: str) -> Iterator[dict[str, Any]]:
    """Rows of a hub dataset, streamed (nothing but the rows read is downloaded)."""
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", str(max(1, int(timeout))))
    os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", str(max(1, int(timeout))))
    import datasets  # imported here: slow to import, and only needed online

    ds = datasets.load_dataset(repo_id, config, split=split, streaming=True)
    with progress(total=limit, desc=desc, unit=" rows", leave=False) as bar:
        for i, row in enumerate(ds):
            if limit is not None and i >= limit:
                break
            bar.update(1)
            yield row


def fallback(reason: str, no_fallback: bool, what: str, instead: str = "the built-in corpus") -> None:
    """Say loudly that built-in data replaces the hub, or stop when --no_fallback is set."""
    if no_fallback:
        raise UserError(f"cannot get {what} from the Hugging Face hub: {reason} (and --no_fallback is set)")
    print(f"WARNING: cannot get {what} from the Hugging Face hub: {reason}; FALLING BACK to {instead} "
          f"(use --source local --input FILE for real data, or --no_fallback to fail instead)",
          file=sys.stderr, flush=True)


def iter_jsonl(path: Path, missing: Optional[str] = None) -> Iterator[tuple[int, Any]]:
    """(line number, parsed JSON) for every non-blank line of a JSON Lines file (optionally
    gzip-compressed). A `UserError` naming the file (and line) for a missing file (``missing``:
    the message, default "input file PATH not found"), bad JSON or an unreadable file; checking
    what each record holds is the caller's."""
    if not path.is_file():
        raise UserError(missing or f"input file {path} not found")
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"{path}:{lineno}: not valid JSON Lines ({e.msg})") from None
                yield lineno, rec
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {path}: {e}") from None


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Records of a JSON Lines file (optionally gzip-compressed); UserError on any problem."""
    records = []
    for lineno, rec in iter_jsonl(path):
        if not isinstance(rec, dict):
            raise UserError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}")
        records.append(rec)
    if not records:
        raise UserError(f"{path} is empty")
    return records


def is_jsonl(path: Path) -> bool:
    return path.name.endswith((".jsonl", ".jsonl.gz", ".ndjson"))


def field(rec: dict[str, Any], name: str, where: str, hint: str = "") -> str:
    """rec[name] as a string; UserError naming the fields the record does have (and `hint`)."""
    if name not in rec:
        raise UserError(f"{where} has no field {name!r} (fields: {', '.join(rec) or 'none'}){hint}")
    value = rec[name]
    if not isinstance(value, str):
        raise UserError(f"{where}: field {name!r} must be a string, got {type(value).__name__}")
    return value


def created_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
