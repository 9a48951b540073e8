"""Named model sizes, as data (the torchtitan way): a preset is a dict of `ModelConfig` fields.

``tiny`` and the ``tiny-<family>`` presets are for tests and quick experiments; each family
preset turns on that family's architecture features at toy width (``tiny-mamba2-hybrid``: Mamba-2
layers around an attention layer, which has no Hugging Face counterpart). ``bench-A`` / ``bench-B`` /
``bench-D`` are the sizes the benchmarks compare against Hugging Face. ``mamba2-nano`` is the nano Mamba-2
recipe (`configs/pretrain/mamba2_nano.yaml`): the width and vocabulary of the nano Llama 3 and
about its parameter count (1.23 M vs 1.26 M), so 6 Mamba-2 layers (no FFN) for its 4 blocks. Any field can be overridden:
``get_preset("tiny-gemma2", n_layers=4)``.
"""
from __future__ import annotations

from typing import Any

from model.config import ModelConfig

_TINY = dict(vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden_dim=172, max_seq_len=128)
_TINY_MAMBA = dict(mamba_state_size=16, mamba_head_dim=16, mamba_n_groups=2, mamba_chunk_size=16)

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(_TINY),
    "llama-50m": dict(
        family="llama", vocab_size=4096, dim=576, n_layers=12, n_heads=9, n_kv_heads=3, ffn_hidden_dim=1536,
        max_seq_len=1024, rope_theta=10000.0,
    ),
    "bench-A": dict(vocab_size=4096, dim=256, n_layers=4, n_heads=8, n_kv_heads=4, ffn_hidden_dim=688, max_seq_len=256),
    "bench-B": dict(vocab_size=8192, dim=512, n_layers=8, n_heads=8, n_kv_heads=8, ffn_hidden_dim=1376, max_seq_len=512),
    "bench-D": dict(  # DeepSeek-V3: MLA with q-LoRA, 8 routed experts top-2 + 1 shared, first layer dense
        family="deepseek_v3", vocab_size=4096, dim=256, n_layers=4, n_heads=8, n_kv_heads=None, ffn_hidden_dim=688,
        max_seq_len=256, norm_eps=1e-6, attention_type="mla", q_lora_rank=128, kv_lora_rank=64, qk_rope_head_dim=16,
        qk_nope_head_dim=32, v_head_dim=32,
        moe=dict(n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, moe_ffn_hidden_dim=128,
                 scoring_func="sigmoid", n_group=1, topk_group=1, first_k_dense_replace=1),
    ),
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
    "tiny-mamba2": dict(_TINY, **_TINY_MAMBA, family="mamba2", position_type="none", tie_embeddings=True),
    "tiny-mamba2-hybrid": dict(_TINY, **_TINY_MAMBA, family="mamba2", n_layers=3,
                               layer_types=["mamba", "full", "mamba"]),
    "mamba2-nano": dict(
        family="mamba2", vocab_size=4096, dim=128, n_layers=6, max_seq_len=512, position_type="none",
        tie_embeddings=True, mamba_state_size=64, mamba_head_dim=32, mamba_expand=2, mamba_n_groups=1,
        mamba_chunk_size=64,
    ),
}


def preset_names() -> list[str]:
    return sorted(PRESETS)


def get_preset(name: str, **overrides: Any) -> ModelConfig:
    """The `ModelConfig` of preset ``name`` with ``overrides`` applied (validated)."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; available: {', '.join(preset_names())}")
    return ModelConfig(**{**PRESETS[name], **overrides})


# ---------------------------------------------------------------------------- classic architectures
# The recipe suite (`utils/setup_classic_models.py`) writes one directory per entry below.
# ``full``: the published architecture, field for field from the model's own config.json on the
# Hugging Face hub (`tests/test_recipes.py` keeps those reference values and checks the parameter
# counts). ``small``: ~100-150 M parameters for one GPU. ``nano``: minutes on 2 CPU cores. The
# nano and small models use the toolkit's 4096-token tokenizer; a full model needs its own.
_NANO = dict(vocab_size=4096, dim=128, n_layers=4, n_heads=4, n_kv_heads=2, ffn_hidden_dim=352, max_seq_len=512)
_SMALL = dict(vocab_size=4096, dim=768, n_layers=16, n_heads=12, n_kv_heads=4, ffn_hidden_dim=2048, max_seq_len=1024)


def _deepseek_v3(**size: Any) -> dict[str, Any]:
    """DeepSeek-V3 (Liu et al. 2024): MLA with q-LoRA, DeepSeekMoE with sigmoid routing, expert groups and
    auxiliary-loss-free balancing, one MTP depth, YaRN."""
    moe = size.pop("moe")
    base = dict(family="deepseek_v3", n_kv_heads=None, norm_eps=1e-6, attention_type="mla", rope_theta=10000.0,
                moe=dict(scoring_func="sigmoid", norm_topk_prob=True, routed_scaling_factor=2.5, **moe),
                mtp_depth=1, tie_embeddings=False)
    return {**base, **size}


def _gemma2(**size: Any) -> dict[str, Any]:
    """Gemma 2 (Gemma Team 2024): GeGLU, sandwich norms, logit soft-capping, local/global attention alternating."""
    n = size["n_layers"]
    return {**dict(family="gemma2", ffn_type="geglu", norm_type="gemma_rmsnorm", norm_eps=1e-6, sandwich_norm=True,
                   embed_scale=True, tie_embeddings=True, attn_logit_softcap=50.0, final_logit_softcap=30.0,
                   rope_theta=10000.0, layer_types=["sliding" if i % 2 == 0 else "full" for i in range(n)]), **size}


def _gemma3(**size: Any) -> dict[str, Any]:
    """Gemma 3 (Gemma Team 2025): QK-norm instead of soft-capping, 5 local layers per global one, two RoPE bases."""
    n = size["n_layers"]
    return {**dict(family="gemma3", ffn_type="geglu", norm_type="gemma_rmsnorm", norm_eps=1e-6, sandwich_norm=True,
                   embed_scale=True, tie_embeddings=True, qk_norm=True, rope_theta=1000000.0, rope_local_theta=10000.0,
                   layer_types=["full" if (i + 1) % 6 == 0 else "sliding" for i in range(n)]), **size}


CLASSIC: dict[str, dict[str, dict[str, Any]]] = {
    "deepseek_v3": {
        "nano": _deepseek_v3(
            **{**_NANO, "n_kv_heads": None}, q_lora_rank=64, kv_lora_rank=32, qk_rope_head_dim=16,
            qk_nope_head_dim=32, v_head_dim=32,
            rope_scaling=dict(type="yarn", factor=2.0, original_max_position_embeddings=256, beta_fast=32.0,
                              beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0),
            moe=dict(n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, moe_ffn_hidden_dim=128,
                     n_group=2, topk_group=1, first_k_dense_replace=1)),
        "small": _deepseek_v3(
            vocab_size=4096, dim=640, n_layers=10, n_heads=10, ffn_hidden_dim=1728, max_seq_len=1024,
            q_lora_rank=192, kv_lora_rank=128, qk_rope_head_dim=32, qk_nope_head_dim=64, v_head_dim=64,
            rope_scaling=dict(type="yarn", factor=4.0, original_max_position_embeddings=256, beta_fast=32.0,
                              beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0),
            moe=dict(n_routed_experts=16, n_shared_experts=1, num_experts_per_tok=2, moe_ffn_hidden_dim=384,
                     n_group=4, topk_group=2, first_k_dense_replace=1)),
        "full": _deepseek_v3(  # deepseek-ai/DeepSeek-V3
            vocab_size=129280, dim=7168, n_layers=61, n_heads=128, ffn_hidden_dim=18432, max_seq_len=163840,
            q_lora_rank=1536, kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128,
            rope_scaling=dict(type="yarn", factor=40.0, original_max_position_embeddings=4096, beta_fast=32.0,
                              beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0),
            moe=dict(n_routed_experts=256, n_shared_experts=1, num_experts_per_tok=8, moe_ffn_hidden_dim=2048,
                     n_group=8, topk_group=4, first_k_dense_replace=3)),
    },
    "llama3": {  # Llama 3 (Grattafiori et al. 2024): GQA, RoPE base 500k, Llama-3.1 RoPE scaling
        "nano": dict(_NANO, family="llama", rope_theta=500000.0, tie_embeddings=True,
                     rope_scaling=dict(type="llama3", factor=2.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                       original_max_position_embeddings=256)),
        "small": dict(_SMALL, family="llama", rope_theta=500000.0, tie_embeddings=True,
                      rope_scaling=dict(type="llama3", factor=4.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                        original_max_position_embeddings=256)),
        "full": dict(  # meta-llama/Llama-3.1-8B (untied, as published)
            family="llama", vocab_size=128256, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_hidden_dim=14336,
            max_seq_len=131072, norm_eps=1e-5, rope_theta=500000.0, tie_embeddings=False,
            rope_scaling=dict(type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                              original_max_position_embeddings=8192)),
    },
    "gemma2": {
        "nano": _gemma2(**{**_NANO, "head_dim": 32}, query_pre_attn_scalar=32, sliding_window=64),
        "small": _gemma2(**{**_SMALL, "n_kv_heads": 6, "head_dim": 64, "ffn_hidden_dim": 2304},
                         query_pre_attn_scalar=64, sliding_window=256),
        "full": _gemma2(  # google/gemma-2-2b
            vocab_size=256000, dim=2304, n_layers=26, n_heads=8, n_kv_heads=4, head_dim=256, ffn_hidden_dim=9216,
            max_seq_len=8192, query_pre_attn_scalar=256, sliding_window=4096),
    },
    "gemma3": {
        "nano": _gemma3(**{**_NANO, "n_layers": 6, "head_dim": 32}, query_pre_attn_scalar=32, sliding_window=64),
        "small": _gemma3(**{**_SMALL, "n_kv_heads": 6, "head_dim": 64, "ffn_hidden_dim": 2304},
                         query_pre_attn_scalar=64, sliding_window=256),
        "full": _gemma3(  # google/gemma-3-1b-pt
            vocab_size=262144, dim=1152, n_layers=26, n_heads=4, n_kv_heads=1, head_dim=256, ffn_hidden_dim=6912,
            max_seq_len=32768, query_pre_attn_scalar=256, sliding_window=512),
    },
    "qwen3": {  # Qwen3 (Yang et al. 2025): GQA, QK-norm, no QKV bias, tied embeddings at small sizes
        "nano": dict(_NANO, family="qwen3", head_dim=32, qk_norm=True, rope_theta=1000000.0, norm_eps=1e-6,
                     tie_embeddings=True),
        "small": dict(_SMALL, family="qwen3", head_dim=64, qk_norm=True, rope_theta=1000000.0, norm_eps=1e-6,
                      tie_embeddings=True),
        "full": dict(  # Qwen/Qwen3-0.6B
            family="qwen3", vocab_size=151936, dim=1024, n_layers=28, n_heads=16, n_kv_heads=8, head_dim=128,
            ffn_hidden_dim=3072, max_seq_len=40960, qk_norm=True, rope_theta=1000000.0, norm_eps=1e-6,
            tie_embeddings=True),
    },
    "mistral": {  # Mistral 7B (Jiang et al. 2023): GQA and sliding-window attention
        "nano": dict(_NANO, family="mistral", sliding_window=64, rope_theta=10000.0),
        "small": dict(_SMALL, family="mistral", sliding_window=256, rope_theta=10000.0),
        "full": dict(  # mistralai/Mistral-7B-v0.1
            family="mistral", vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_hidden_dim=14336,
            max_seq_len=32768, sliding_window=4096, rope_theta=10000.0, norm_eps=1e-5),
    },
}
CLASSIC_SIZES = ("nano", "small", "full")


def classic_config(model: str, size: str) -> ModelConfig:
    """The `ModelConfig` of a classic architecture (``CLASSIC[model][size]``)."""
    return ModelConfig(**CLASSIC[model][size])
