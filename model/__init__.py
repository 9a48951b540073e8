"""The pure-PyTorch model package: one `Transformer` for every supported family.

Imports nothing from the rest of the project. Typical use::

    from model import build_model, get_preset
    model = build_model(get_preset("tiny-llama3"))
    logits = model(tokens)                    # (B, T, V)

Names are imported lazily (PEP 562), so `from model.config import ModelConfig` — what config
validation needs — does not pay for importing torch.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "build_model": "model.build",
    "count_params": "model.build",
    "flops_per_token": "model.build",
    "init_weights": "model.build",
    "KVCache": "model.cache",
    "KVLayerCache": "model.cache",
    "LatentLayerCache": "model.cache",
    "ModelConfig": "model.config",
    "MoEConfig": "model.config",
    "RopeScaling": "model.config",
    "set_mla_absorb": "model.mla",
    "PRESETS": "model.presets",
    "get_preset": "model.presets",
    "preset_names": "model.presets",
    "Block": "model.transformer",
    "Transformer": "model.transformer",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'model' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
