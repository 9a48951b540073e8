"""Run directories: ``runs/<stage>/<run_name>/`` with config.yaml, metrics.jsonl, checkpoints/
and a log file. Logging goes through `logging` (rank 0 only under torchrun)."""
from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Optional

from pydantic import BaseModel

from utils.config import save_config

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class RunDir:
    """Paths of one run and the writers for its config, metrics and log."""

    def __init__(self, runs_dir: Path, stage: str, run_name: str, run_dir: Optional[Path] = None):
        self.root = Path(run_dir) if run_dir is not None else Path(runs_dir) / stage / run_name
        self.config_path = self.root / "config.yaml"
        self.metrics_path = self.root / "metrics.jsonl"
        self.checkpoints = self.root / "checkpoints"
        self.log_path = self.root / "train.log"

    def create(self, cfg: Optional[BaseModel] = None) -> "RunDir":
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        if cfg is not None:
            save_config(cfg, self.config_path)
        return self

    def log_metrics(self, record: dict[str, Any]) -> None:
        """Append one JSON line (with a wall-clock time) to metrics.jsonl."""
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps({"time": round(time.time(), 3), **record}) + "\n")

    def read_metrics(self) -> list[dict]:
        if not self.metrics_path.exists():
            return []
        return [json.loads(line) for line in self.metrics_path.read_text().splitlines() if line.strip()]


def setup_logging(log_file: Optional[Path] = None, rank: int = 0, level: int = logging.INFO) -> None:
    """Root logger → stderr (+ a log file); ranks other than 0 only log warnings."""
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.setLevel(level if rank == 0 else logging.WARNING)
    fmt = logging.Formatter(LOG_FORMAT, datefmt="%H:%M:%S")
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(fmt)
    root.addHandler(console)
    if log_file is not None and rank == 0:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(log_file)
        fh.setFormatter(fmt)
        root.addHandler(fh)
