"""Training metrics: throughput, MFU, memory, and where they are written.

MFU (model FLOPs utilisation, Chowdhery et al. 2022, PaLM appendix B) is
``achieved model FLOP/s / peak FLOP/s``, with achieved = ``flops_per_token × tokens/s`` from
the model's analytic count (`model.flops_per_token`, 6N + attention, forward + backward).
It has one definition in this repository — `peak_flops` — used by the trainer's metrics and
by every benchmark that reports ``mfu``. The peak of one device is
* the dense bf16/fp16 tensor-core peak from NVIDIA's datasheet, for a known GPU (by device
  name) training in bf16/fp16 — the usual MFU denominator (PaLM, nanoGPT, torchtitan); else
* a measurement, for CPUs, MPS, unknown GPUs and fp32: the best of several large square
  matmuls in the compute dtype (n = 8192 on CUDA, 4096 on MPS, 1024 on CPU — each large
  enough to reach its BLAS's peak), once per process. That is what the machine sustains on
  its best-case kernel, so such an MFU reads "fraction of achievable", not "of the datasheet".
Every record with an ``mfu`` carries ``mfu_peak_source``, naming which peak and its value.

`MetricsLogger` writes every record to ``metrics.jsonl`` of the run (rank 0), mirrors the
scalars to TensorBoard / Weights & Biases when enabled in ``logging``, and drives a progress
bar (on a terminal only, `utils.progress`).
"""
from __future__ import annotations

import functools
import logging
import resource
import sys
import time
from typing import Any, Optional

import torch

from utils.config import LoggingConfig
from utils.errors import UserError
from utils.progress import progress
from utils.runs import RunDir

logger = logging.getLogger(__name__)

# Dense (non-sparse) bf16/fp16 tensor-core peak FLOP/s from NVIDIA datasheets, by name fragment.
GPU_PEAK_FLOPS: dict[str, float] = {
    "H200": 989e12, "H100": 989e12, "H800": 989e12, "GH200": 989e12,
    "B200": 2250e12, "B100": 1750e12,
    "A100": 312e12, "A800": 312e12, "A10G": 70e12, "A10": 125e12, "A6000": 155e12, "A40": 150e12,
    "L40S": 362e12, "L40": 181e12, "L4": 121e12,
    "RTX 4090": 165e12, "RTX 3090": 71e12, "V100": 125e12, "T4": 65e12,
}


def table_peak_flops(device_name: str) -> Optional[float]:
    """Datasheet peak for a GPU name such as "NVIDIA H100 80GB HBM3" (longest match wins)."""
    hits = [k for k in GPU_PEAK_FLOPS if k in device_name]
    return GPU_PEAK_FLOPS[max(hits, key=len)] if hits else None


MEASURE_N = {"cuda": 8192, "mps": 4096}  # matmul size of a measured peak; other devices: 1024


def matmul_size(device_type: str) -> int:
    """Side of the square matmul that measures a device's peak."""
    return MEASURE_N.get(device_type, 1024)


@functools.lru_cache(maxsize=None)
def measured_peak_flops(device_type: str, dtype: torch.dtype, reps: int = 5) -> float:
    """Best FLOP/s of an n×n @ n×n matmul (n = `matmul_size`, 2n³ FLOPs) on this device, measured once."""
    n = matmul_size(device_type)
    device = torch.device(device_type)
    gen = torch.Generator().manual_seed(0)  # private: training's random streams stay untouched
    a = torch.randn(n, n, generator=gen).to(device, dtype)
    b = torch.randn(n, n, generator=gen).to(device, dtype)
    best = float("inf")
    for _ in range(reps + 1):  # the first run warms up
        _sync(device)
        t0 = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def peak_flops(device: torch.device, dtype: torch.dtype) -> tuple[float, str]:
    """(peak FLOP/s of one device, ``mfu_peak_source``): the one MFU denominator (module docstring)."""
    dtype_name = str(dtype).removeprefix("torch.")
    if device.type == "cuda" and dtype in (torch.bfloat16, torch.float16):
        name = torch.cuda.get_device_name(device)
        peak = table_peak_flops(name)
        if peak is not None:
            return peak, f"datasheet: {name}, dense bf16/fp16, {peak / 1e12:g} TFLOP/s"
    peak = measured_peak_flops(device.type, dtype)
    n = matmul_size(device.type)
    return peak, f"measured: best {n}x{n} {dtype_name} matmul on {device.type}, {peak / 1e12:.3g} TFLOP/s"


def mfu(flops_per_token: float, tokens_per_s: float, peak: float, world_size: int = 1) -> float:
    """Model FLOPs utilisation of `world_size` devices of peak `peak` each."""
    return flops_per_token * tokens_per_s / (peak * world_size)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def peak_memory_gb(device: torch.device) -> float:
    """Peak accelerator memory (cuda: max allocated; mps: driver allocated) or, on CPU, the
    process's peak resident set size, in GiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    if device.type == "mps":
        return torch.mps.driver_allocated_memory() / 2**30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**30 if sys.platform == "darwin" else 2**20)


class Throughput:
    """Tokens/s between two `measure` calls (the device is synchronised first)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.tokens = 0
        self.t0 = time.perf_counter()

    def add(self, tokens: int) -> None:
        self.tokens += tokens

    def measure(self) -> float:
        _sync(self.device)
        now = time.perf_counter()
        rate = self.tokens / max(now - self.t0, 1e-9)
        self.tokens, self.t0 = 0, now
        return rate


class MetricsLogger:
    """metrics.jsonl (+ TensorBoard / W&B) and a progress bar, active on rank 0 only."""

    def __init__(self, run: Optional[RunDir], cfg: LoggingConfig, active: bool, total_steps: int,
                 start_step: int = 0, config: Optional[dict] = None) -> None:
        self.run = run
        self.active = active and run is not None
        self.tb = None
        self.wandb = None
        if self.active and cfg.tensorboard:
            self.tb = _tensorboard_writer(run)
        if self.active and cfg.wandb:
            self.wandb = _wandb_run(cfg, run, config)
        # a bar on a terminal only: in a log file the periodic "step N/M | loss ..." lines are the progress
        self.bar = progress(total=total_steps, desc="train", enabled=self.active, lines=False, stream=sys.stderr,
                            initial=start_step, dynamic_ncols=True, mininterval=1.0)

    def log(self, step: int, record: dict[str, Any]) -> None:
        """Append ``{"step": step, **record}`` to metrics.jsonl and mirror the scalars."""
        if not self.active:
            return
        self.run.log_metrics({"step": step, **record})
        scalars = {k: v for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)

    def advance(self, n: int = 1, **postfix: float) -> None:
        if self.active:
            self.bar.update(n)
            if postfix:
                self.bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)

    def reset_bar(self, step: int) -> None:
        """Move the bar back (after a rollback)."""
        if self.active:
            self.bar.reset(total=self.bar.total)
            self.bar.update(step)

    def close(self) -> None:
        self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def _tensorboard_writer(run: RunDir):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError("logging.tensorboard is true but the `tensorboard` package is not installed: "
                        "pip install tensorboard (or set logging.tensorboard=false)") from None
    return SummaryWriter(log_dir=str(run.root / "tensorboard"))


def _wandb_run(cfg: LoggingConfig, run: RunDir, config: Optional[dict]):
    try:
        import wandb
    except ImportError:
        raise UserError("logging.wandb is true but the `wandb` package is not installed: "
                        "pip install wandb (or set logging.wandb=false)") from None
    return wandb.init(project=cfg.wandb_project, name=run.root.name, dir=str(run.root), config=config)
