"""User-facing errors: a user mistake exits with code 2 and one clear line, never a traceback.

Scripts raise `UserError` for anything the user can fix (bad config, missing file, wrong
format). `cli_main` turns it into ``error: <message>`` on stderr and exit status 2. Any other
exception is a bug and keeps its traceback.
"""
from __future__ import annotations

import sys
from typing import Callable, NoReturn

EXIT_USER_ERROR = 2


class UserError(Exception):
    """A mistake the user can fix; its message is shown alone on one line."""


def fail(message: str) -> NoReturn:
    """Print one line to stderr and exit with code 2."""
    one_line = " ".join(str(message).split())
    print(f"error: {one_line}", file=sys.stderr, flush=True)
    raise SystemExit(EXIT_USER_ERROR)


def cli_main(fn: Callable[[], object]) -> None:
    """Run a script's ``main()``; a `UserError` becomes one stderr line and exit code 2."""
    try:
        fn()
    except UserError as e:
        fail(str(e))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        raise SystemExit(130)
