"""Progress reporting that suits where the output goes.

On a terminal: a tqdm bar. Anywhere else (CI, ``> log``, ``nohup``) a bar's carriage-return
redraws would pile up in the file as one endless line, so instead: a plain line at most every
`interval` seconds and one at the end (`LineProgress`), or nothing at all where the caller
logs periodic lines of its own (the training loop's ``step N/M | loss ...``).

    for story in progress(stories, desc="counting tokens", unit="story"):
        ...
    with progress(total=n, desc="bpe merges") as bar:
        bar.update(1)
"""
from __future__ import annotations

import sys
import time
from typing import Any, Iterable, Iterator, Optional, TextIO

from tqdm import tqdm

LINE_INTERVAL_S = 30.0  # seconds between two progress lines when the output is not a terminal


def is_terminal(stream: Any) -> bool:
    """Whether `stream` is an interactive terminal (False for pipes, files and closed streams)."""
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # closed
        return False


class LineProgress:
    """tqdm's small interface (iterate, `update`, `set_postfix`, `reset`, `close`, ``with``) as
    periodic plain lines: ``desc: 1200/5000 story (24%, 310 story/s)``."""

    def __init__(self, iterable: Optional[Iterable] = None, total: Optional[float] = None, desc: str = "",
                 unit: str = "it", initial: float = 0, stream: Optional[TextIO] = None,
                 interval: float = LINE_INTERVAL_S) -> None:
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        self.iterable, self.total, self.desc, self.unit = iterable, total, desc, unit.strip()  # tqdm's " rows" style
        self.n = self.shown = initial
        self.stream = stream or sys.stderr
        self.interval = interval
        self.postfix = ""
        self.start = self.last = time.monotonic()
        self.closed = False

    def __iter__(self) -> Iterator:
        for item in self.iterable or ():
            yield item
            self.update(1)
        self.close()

    def __len__(self) -> int:
        return int(self.total or 0)

    def __enter__(self) -> "LineProgress":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def update(self, n: float = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= self.interval:
            self._line(now)

    def set_postfix(self, ordered_dict: Optional[dict] = None, refresh: bool = True, **kwargs: Any) -> None:
        items = {**(ordered_dict or {}), **kwargs}
        self.postfix = ", ".join(f"{k}={v}" for k, v in items.items())

    def reset(self, total: Optional[float] = None) -> None:
        self.n = self.shown = 0
        if total is not None:
            self.total = total

    def close(self) -> None:
        if not self.closed and self.n != self.shown:
            self._line(time.monotonic())
        self.closed = True

    def _line(self, now: float) -> None:
        done = f"{self.n:g}/{self.total:g}" if self.total else f"{self.n:g}"
        share = f"{self.n / self.total:.0%}, " if self.total else ""
        rate = self.n / max(now - self.start, 1e-9)
        extra = f" {self.postfix}" if self.postfix else ""
        print(f"{self.desc}: {done} {self.unit} ({share}{rate:.3g} {self.unit}/s){extra}", file=self.stream, flush=True)
        self.last, self.shown = now, self.n


def progress(iterable: Optional[Iterable] = None, *, total: Optional[float] = None, desc: str = "", unit: str = "it",
             enabled: bool = True, lines: bool = True, stream: Optional[TextIO] = None,
             **tqdm_kwargs: Any) -> tqdm | LineProgress:
    """A progress bar for `iterable` (or `total` manual updates) on `stream` (default stderr).

    A tqdm bar on a terminal; otherwise `LineProgress` lines, or with ``lines=False`` nothing.
    ``enabled=False`` shows nothing anywhere. `tqdm_kwargs` apply to the terminal bar only.
    """
    stream = stream or sys.stderr
    if enabled and is_terminal(stream):
        return tqdm(iterable, total=total, desc=desc, unit=unit, file=stream, **tqdm_kwargs)
    if enabled and lines:
        return LineProgress(iterable, total=total, desc=desc, unit=unit, initial=tqdm_kwargs.get("initial", 0),
                            stream=stream)
    return tqdm(iterable, total=total, disable=True)
