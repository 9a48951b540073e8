"""MLA decoding measurements for `benchmarks/decode_speed.py`: which attention path a decode step
takes and what the latent cache holds per token.

Multi-head latent attention (DeepSeek-V2, Liu et al. 2024, §2.1; `model/mla.py`) caches per token
and layer only the normalised latent ``c_kv`` (kv_lora_rank) and the shared rotated RoPE key
(qk_rope_head_dim), where multi-head attention caches a key (qk_nope + qk_rope) and a value
(v_head_dim) per head. Decoding over that cache in latent space (the absorbed path: W_uk folded
into the query, W_uv into the output) reads only the latents.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch
import torch.nn as nn

from inference.engine.paged_cache import PagedKVCache, kv_bytes_per_token
from model import get_preset
from model.config import ModelConfig
from model.mla import MLA


@contextmanager
def count_mla_attention(model: nn.Module) -> Iterator[dict[str, int]]:
    """Count, while inside, the attention calls of ``model``'s MLA layers by path ("absorbed" /
    "naive", summed over layers): yields the live counts."""
    layers = [m for m in model.modules() if isinstance(m, MLA)]
    calls = {"absorbed": 0, "naive": 0}

    def counted(module: MLA, path: str) -> Callable[..., torch.Tensor]:
        method = getattr(type(module), f"_{path}")

        def run(*args, **kwargs) -> torch.Tensor:
            calls[path] += 1
            return method(module, *args, **kwargs)

        return run

    for layer in layers:  # instance attributes shadow the class's methods
        layer._absorbed, layer._naive = counted(layer, "absorbed"), counted(layer, "naive")
    try:
        yield calls
    finally:
        for layer in layers:
            del layer._absorbed, layer._naive


def mha_bytes_per_token(cfg: ModelConfig, dtype: torch.dtype) -> int:
    """Cache bytes per token (all layers) of multi-head attention with MLA's heads: K and V per head."""
    per_head = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim + cfg.v_head_dim
    return cfg.n_layers * cfg.n_heads * per_head * dtype.itemsize


def latent_cache_report(cfg: ModelConfig, dtype: torch.dtype, engine_bytes_per_token: int) -> dict:
    """Latent cache bytes per token (all layers) vs the equivalent MHA cache, and what the engine's
    pool really holds per token (``engine_bytes_per_token``)."""
    latent = kv_bytes_per_token(cfg, dtype)
    mha = mha_bytes_per_token(cfg, dtype)
    return {"dtype": str(dtype).removeprefix("torch."), "kv_bytes_per_token": latent,
            "engine_cache_bytes_per_token": engine_bytes_per_token,
            "latent_entry": {"kv_lora_rank": cfg.kv_lora_rank, "qk_rope_head_dim": cfg.qk_rope_head_dim},
            "mha_equivalent_bytes_per_token": mha, "mha_over_latent": round(mha / latent, 2)}


def mla_cache_bytes() -> dict:
    """Latent cache bytes per token and layer vs the MHA cache of the same heads (K and V per head)."""
    out = {}
    shapes = {
        "tiny-deepseek_v3": get_preset("tiny-deepseek_v3"),
        "deepseek_v3_shape": get_preset("tiny-deepseek_v3", dim=7168, n_heads=128, q_lora_rank=1536,
                                        kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128),
    }
    for name, cfg in shapes.items():
        per_layer = kv_bytes_per_token(cfg, torch.bfloat16) // cfg.n_layers
        mha = mha_bytes_per_token(cfg, torch.bfloat16) // cfg.n_layers
        out[name] = {"mla_bytes_per_token_layer_bf16": per_layer, "mha_bytes_per_token_layer_bf16": mha,
                     "mha_over_mla": round(mha / per_layer, 1)}
    cfg = shapes["tiny-deepseek_v3"]
    pool = PagedKVCache(cfg, num_blocks=4, block_size=16, max_num_seqs=1, device=torch.device("cpu"),
                        dtype=torch.bfloat16)
    measured = pool.allocated_bytes // ((4 + 1) * 16) // cfg.n_layers  # +1: the scratch block
    out["tiny-deepseek_v3"]["measured_pool_bytes_per_token_layer"] = measured
    return out
