"""Progress output (utils/progress.py): a bar on a terminal, plain periodic lines elsewhere, so
log files of CI, ``> log`` or ``nohup`` runs hold no carriage-return floods (issue 14, defect 10)."""
from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import yaml
from tqdm import tqdm

from trainer_fixtures import make_pretrain_data, tiny_config_dict
from utils.paths import REPO_ROOT
from utils.progress import LineProgress, is_terminal, progress


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_not_a_terminal_gives_plain_lines() -> None:
    out = io.StringIO()
    bar = LineProgress(range(5), desc="counting", unit="doc", stream=out, interval=0.0)
    assert list(bar) == [0, 1, 2, 3, 4]
    lines = out.getvalue().splitlines()
    assert len(lines) == 5 and "\r" not in out.getvalue()
    assert lines[-1].startswith("counting: 5/5 doc (100%, ")
    quiet = io.StringIO()
    with LineProgress(total=1000, desc="merges", stream=quiet) as bar:  # default: a line every 30 s
        for _ in range(1000):
            bar.update(1)
    assert quiet.getvalue().count("\n") == 1 and quiet.getvalue().startswith("merges: 1000/1000 it (100%")


def test_progress_picks_by_stream() -> None:
    assert is_terminal(_Terminal()) and not is_terminal(io.StringIO())
    bar = progress(total=3, desc="x", stream=_Terminal())
    assert isinstance(bar, tqdm) and not bar.disable
    bar.close()
    assert isinstance(progress(total=3, stream=io.StringIO()), LineProgress)
    for stream, kwargs in ((io.StringIO(), {"lines": False}), (_Terminal(), {"enabled": False})):
        silent = progress([1, 2], desc="x", stream=stream, **kwargs)  # nothing shown, iteration intact
        assert list(silent) == [1, 2]
        silent.close()
        assert stream.getvalue() == ""


def test_training_into_a_pipe_writes_no_bar(tmp_path: Path) -> None:
    """A tiny training run with stdout and stderr to pipes (a CI log): its log lines only."""
    data = make_pretrain_data(tmp_path, n_train_docs=60, n_val_docs=20)
    cfg = tiny_config_dict(data, tmp_path / "runs", training={"max_steps": 6, "eval_interval": 6},
                           logging={"log_interval": 3}, checkpointing={"save_interval": 6})
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "pretrain/train.py", "--config_path", str(tmp_path / "cfg.yaml")],
                          cwd=REPO_ROOT, env=env, capture_output=True, timeout=300)  # bytes: \r kept as is
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out.decode()[-2000:]
    assert b"\r" not in out and b"it/s" not in out, out.decode()[-2000:]
    assert out.count(b"step 3/6 | loss") == 1 and out.count(b"step 6/6 | loss") == 1
