"""Plot a run's training curves: ``python utils/plot_metrics.py RUN_DIR`` → RUN_DIR/loss.png.

Reads ``metrics.jsonl`` (one JSON record per line, written by the training engine) and draws
the training loss (and validation loss where logged) against the step, with the learning
rate on a second panel. Uses matplotlib's non-interactive Agg backend, so it works on
machines without a display; training calls it once at the end.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from utils.errors import UserError, cli_main


def read_metrics(path: Path) -> list[dict]:
    records = []
    for i, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            raise UserError(f"{path}:{i} is not a JSON line (is this a metrics.jsonl?)") from None
    return records


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of every record that has a numeric `key`."""
    pts = [(r["step"], r[key]) for r in records if "step" in r and isinstance(r.get(key), (int, float))]
    return [s for s, _ in pts], [v for _, v in pts]


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write the loss (+ lr) figure of `run_dir` and return its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"no metrics.jsonl in {run_dir} (is it a run directory, e.g. runs/pretrain/<run>?)")
    records = read_metrics(path)
    fig, (ax_loss, ax_lr) = plt.subplots(2, 1, figsize=(8, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    for key, label, style in (("loss", "train loss", "-"), ("val_loss", "val loss", "o-")):
        steps, values = series(records, key)
        if steps:
            ax_loss.plot(steps, values, style, label=label, markersize=3)
    ax_loss.set_ylabel("loss")
    ax_loss.set_title(run_dir.name)
    ax_loss.grid(alpha=0.3)
    if ax_loss.lines:
        ax_loss.legend()
    steps, values = series(records, "lr")
    ax_lr.plot(steps, values, color="tab:gray")
    ax_lr.set_ylabel("lr")
    ax_lr.set_xlabel("step")
    ax_lr.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(out) if out is not None else run_dir / "loss.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="a run directory holding metrics.jsonl")
    parser.add_argument("--out", default=None, help="output image (default RUN_DIR/loss.png)")
    args = parser.parse_args()
    print(plot_run(args.run_dir, args.out))


if __name__ == "__main__":
    cli_main(main)
