"""The pure-PyTorch model package: one `Transformer` for every supported family.

Imports nothing from the rest of the project. Typical use::

    from model import build_model, get_preset
    model = build_model(get_preset("tiny-llama3"))
    logits = model(tokens)                    # (B, T, V)
"""
from model.build import build_model, count_params, flops_per_token, init_weights
from model.cache import KVCache, KVLayerCache, LatentLayerCache
from model.config import ModelConfig, MoEConfig, RopeScaling
from model.mla import set_mla_absorb
from model.presets import PRESETS, get_preset, preset_names
from model.transformer import Block, Transformer

__all__ = [
    "Block",
    "KVCache",
    "KVLayerCache",
    "LatentLayerCache",
    "ModelConfig",
    "MoEConfig",
    "PRESETS",
    "RopeScaling",
    "Transformer",
    "build_model",
    "count_params",
    "flops_per_token",
    "get_preset",
    "init_weights",
    "preset_names",
    "set_mla_absorb",
]
