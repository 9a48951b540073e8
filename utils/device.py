"""Device, dtype and RNG helpers shared by every stage (small and boring on purpose)."""
from __future__ import annotations

import random
from typing import Optional

import numpy as np
import torch

from utils.errors import UserError

_DTYPES = {
    "fp32": torch.float32, "float32": torch.float32,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16,
}


def pick_device(preference: str | torch.device = "auto") -> torch.device:
    """cuda → mps → cpu when `preference` is "auto"; an explicit choice ("cpu", "cuda", "cuda:N",
    "mps") must be available."""
    preference = str(preference)
    if preference.startswith("cuda:"):
        index = preference.split(":", 1)[1]
        if not index.isdigit():
            raise UserError(f"unknown device {preference!r} (allowed: auto, cpu, cuda, cuda:N, mps)")
        if not torch.cuda.is_available() or int(index) >= torch.cuda.device_count():
            raise UserError(f"device {preference} requested but it is not available")
        return torch.device(preference)
    if preference == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if preference == "cuda" and not torch.cuda.is_available():
        raise UserError("device cuda requested but CUDA is not available (use --device cpu or auto)")
    if preference == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UserError("device mps requested but MPS is not available (use --device cpu or auto)")
    if preference not in ("cpu", "cuda", "mps"):
        raise UserError(f"unknown device {preference!r} (allowed: auto, cpu, cuda, cuda:N, mps)")
    return torch.device(preference)


def pick_dtype(preference: str | torch.dtype, device: torch.device) -> torch.dtype:
    """Compute dtype: "auto" → bf16 on GPUs that support it, fp32 on CPU (fp32 matmul is faster
    than bf16 on CPUs without AMX) and on MPS; or fp32/float32, bf16/bfloat16, fp16/float16."""
    if isinstance(preference, torch.dtype):
        return preference
    if preference == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if preference not in _DTYPES:
        raise UserError(f"unknown dtype {preference!r} (allowed: auto, {', '.join(_DTYPES)})")
    return _DTYPES[preference]


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def get_rng_state() -> dict:
    """Every global generator's state, storable by `utils.checkpoint` (no pickle)."""
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), int(pos), int(has_gauss), float(cached)))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["cuda"]))


def autocast_context(device: torch.device, dtype: torch.dtype):
    """`torch.autocast` for reduced precision; a no-op context for fp32."""
    import contextlib

    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def describe(device: torch.device, dtype: torch.dtype, threads: Optional[int] = None) -> str:
    threads = threads or torch.get_num_threads()
    return f"device={device.type} dtype={str(dtype).replace('torch.', '')} threads={threads}"
