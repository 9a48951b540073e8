"""Where things live: the repo root, the default data dir, the shared real-data dir."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

REPO_ROOT: Path = Path(__file__).resolve().parent.parent
DEFAULT_DATA_DIR: Path = REPO_ROOT / "data"
RUNS_DIR: Path = REPO_ROOT / "runs"


def resolve_path(p: str | os.PathLike, base: Path = REPO_ROOT) -> Path:
    """Absolute paths stay; relative paths resolve against `base` (the repo root by default)."""
    path = Path(os.path.expanduser(str(p)))
    return path if path.is_absolute() else (base / path).resolve()


def shared_data_dir() -> Optional[Path]:
    """The real public data for tests and benchmarks: env LLM_DATA_DIR, else ../shared/data.

    Returns None when neither exists (callers skip with a clear reason).
    """
    env = os.environ.get("LLM_DATA_DIR")
    candidates = [Path(env)] if env else []
    candidates.append(REPO_ROOT.parent / "shared" / "data")
    for c in candidates:
        if c.is_dir():
            return c.resolve()
    return None
