"""User-facing errors: a user mistake exits with code 2 and one clear line, never a traceback.

Scripts raise `UserError` for anything the user can fix (bad config, missing file, wrong
format). `cli_main` turns it into ``error: <message>`` on stderr and exit status 2. Any other
exception is a bug and keeps its traceback.

Under ``torchrun`` every rank runs the script and usually meets the same mistake (the same
config, the same run directory), seconds apart. Then (`fail`):

- every rank writes the line to its torchrun error file (``TORCHELASTIC_ERROR_FILE``, the file
  `torch.distributed.elastic.multiprocessing.errors.record` writes, in the same JSON layout), so
  the launcher's closing failure summary shows the line as the root cause instead of "To enable
  traceback see ...";
- every rank counts itself in the launcher's key-value store; rank 0 waits (at most
  `PEER_GRACE_S`) until all have, so that none is still starting up when it leaves, then prints
  the line — the only rank that does — and exits 2;
- the other ranks wait for that: torchrun stops them once rank 0 has exited, and they exit 2
  too (also on their own after `PEER_GRACE_S`, if rank 0 never meets the mistake);
- every exit is `os._exit` after flushing output and logs: no rank waits in a collective for a
  peer that has gone, or in interpreter teardown until the launcher kills it.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
from typing import Any, Callable, NoReturn, Optional

EXIT_USER_ERROR = 2
PEER_GRACE_S = 20.0  # the longest a rank waits for the others to report the same mistake


class UserError(Exception):
    """A mistake the user can fix; its message is shown alone on one line."""


def one_line(message: str) -> str:
    """``error: <message>`` with all whitespace (newlines too) collapsed to single spaces."""
    return "error: " + " ".join(str(message).split())


def torchrun_rank() -> Optional[tuple[int, int]]:
    """``(rank, world_size)`` when torchrun started this process with others, else None."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return None
    try:
        rank, world_size = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:  # malformed launcher variables: behave as a single process
        return None
    return (rank, world_size) if world_size > 1 else None


def error_file_record(line: str, timestamp: float) -> dict:
    """The JSON torchrun's agent reads from a worker's error file (the layout `record` writes),
    with the one line as the message and no traceback, since a user mistake has none."""
    return {"message": {"message": line, "extraInfo": {"timestamp": str(int(timestamp))}}}


def write_error_file(line: str) -> None:
    """Leave `line` in this worker's torchrun error file, if the launcher gave it one."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    try:
        with open(path, "w") as f:
            json.dump(error_file_record(line, time.time()), f)
    except OSError:
        pass  # the launcher still reports the exit status


def _launcher_store() -> Optional[Any]:
    """A client of the key-value store torchrun's agent serves at MASTER_ADDR:MASTER_PORT, or None."""
    try:
        from datetime import timedelta

        from torch.distributed import TCPStore

        return TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                        timeout=timedelta(seconds=5))
    except Exception:  # no store (or it is gone): ranks then simply do not wait for each other
        return None


def _count_in(store: Optional[Any], key: str, add: int) -> int:
    """Add `add` to the counter `key` and return it (0 without a store or when it fails)."""
    try:
        return int(store.add(key, add)) if store is not None else 0
    except Exception:
        return 0


def _exit_now(code: int) -> NoReturn:
    """Flush output and logs, then leave without interpreter teardown."""
    logging.shutdown()  # flush train.log; nothing else needs a clean teardown after a user mistake
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _fail_under_torchrun(line: str, rank: int, world_size: int) -> NoReturn:
    """See the module docstring: the error file, the count, rank 0's line, exit 2 everywhere."""

    def leave(*_: object) -> NoReturn:
        if rank == 0:
            print(line, file=sys.stderr, flush=True)
        _exit_now(EXIT_USER_ERROR)

    write_error_file(line)
    signal.signal(signal.SIGTERM, leave)  # torchrun stopping this rank: it still reports and exits 2
    store = _launcher_store()
    key = f"utils.errors/{os.environ.get('TORCHELASTIC_RUN_ID')}/{os.environ.get('TORCHELASTIC_RESTART_COUNT')}"
    _count_in(store, key, 1)
    deadline = time.monotonic() + PEER_GRACE_S
    try:
        if rank == 0:
            while store is not None and _count_in(store, key, 0) < world_size and time.monotonic() < deadline:
                time.sleep(0.05)
        else:
            time.sleep(PEER_GRACE_S)
    except KeyboardInterrupt:
        pass
    leave()


def fail(message: str) -> NoReturn:
    """Print ``error: <message>`` as one line on stderr and exit with code 2 (under torchrun:
    once, from rank 0; see the module docstring)."""
    line = one_line(message)
    dist = torchrun_rank()
    if dist is not None:
        _fail_under_torchrun(line, *dist)
    print(line, file=sys.stderr, flush=True)
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
