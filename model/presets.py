"""Named model sizes, as data (the torchtitan way): a preset is a dict of `ModelConfig` fields.

``tiny`` and the ``tiny-<family>`` presets are for tests and quick experiments; each family
preset turns on that family's architecture features at toy width. ``bench-A`` / ``bench-B``
are the sizes the benchmarks compare against Hugging Face. Any field can be overridden:
``get_preset("tiny-gemma2", n_layers=4)``.
"""
from __future__ import annotations

from typing import Any

from model.config import ModelConfig

_TINY = dict(vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden_dim=172, max_seq_len=128)

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(_TINY),
    "llama-50m": dict(
        family="llama", vocab_size=4096, dim=576, n_layers=12, n_heads=9, n_kv_heads=3, ffn_hidden_dim=1536,
        max_seq_len=1024, rope_theta=10000.0,
    ),
    "bench-A": dict(vocab_size=4096, dim=256, n_layers=4, n_heads=8, n_kv_heads=4, ffn_hidden_dim=688, max_seq_len=256),
    "bench-B": dict(vocab_size=8192, dim=512, n_layers=8, n_heads=8, n_kv_heads=8, ffn_hidden_dim=1376, max_seq_len=512),
    "tiny-llama3": dict(
        _TINY, family="llama", rope_theta=500000.0,
        rope_scaling=dict(type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=64),
    ),
    "tiny-qwen2": dict(_TINY, family="qwen2", qkv_bias=True, rope_theta=1000000.0, norm_eps=1e-6, tie_embeddings=True),
    "tiny-qwen3": dict(
        _TINY, family="qwen3", head_dim=32, qk_norm=True, rope_theta=1000000.0, norm_eps=1e-6, tie_embeddings=True,
    ),
    "tiny-mistral": dict(_TINY, family="mistral", sliding_window=16, rope_theta=1000000.0),
    "tiny-gemma2": dict(
        _TINY, family="gemma2", n_layers=4, head_dim=32, ffn_type="geglu", norm_type="gemma_rmsnorm", norm_eps=1e-6,
        sandwich_norm=True, embed_scale=True, tie_embeddings=True, query_pre_attn_scalar=32,
        attn_logit_softcap=50.0, final_logit_softcap=30.0, sliding_window=16,
        layer_types=["sliding", "full", "sliding", "full"],
    ),
    "tiny-gemma3": dict(
        _TINY, family="gemma3", n_layers=6, head_dim=32, ffn_type="geglu", norm_type="gemma_rmsnorm", norm_eps=1e-6,
        sandwich_norm=True, embed_scale=True, tie_embeddings=True, query_pre_attn_scalar=32, qk_norm=True,
        sliding_window=16, layer_types=["sliding"] * 5 + ["full"], rope_theta=1000000.0, rope_local_theta=10000.0,
        rope_scaling=dict(type="linear", factor=8.0),
    ),
    "tiny-deepseek_v3": dict(
        _TINY, family="deepseek_v3", n_layers=3, n_kv_heads=None, norm_eps=1e-6, attention_type="mla",
        q_lora_rank=48, kv_lora_rank=32, qk_rope_head_dim=16, qk_nope_head_dim=32, v_head_dim=32,
        rope_scaling=dict(type="yarn", factor=4.0, original_max_position_embeddings=32, beta_fast=32.0,
                          beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0),
        moe=dict(n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, moe_ffn_hidden_dim=32,
                 scoring_func="sigmoid", n_group=4, topk_group=2, routed_scaling_factor=2.5,
                 first_k_dense_replace=1),
        mtp_depth=1,
    ),
}


def preset_names() -> list[str]:
    return sorted(PRESETS)


def get_preset(name: str, **overrides: Any) -> ModelConfig:
    """The `ModelConfig` of preset ``name`` with ``overrides`` applied (validated)."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; available: {', '.join(preset_names())}")
    return ModelConfig(**{**PRESETS[name], **overrides})
