"""Incremental decoding with the cache gives the same logits as one full forward.

For each attention variant: prefill a prompt, decode 32 tokens one at a time; the logits of
every step must equal those of a full forward over the whole sequence (fp32, max |diff| <= 1e-5).
"""
from __future__ import annotations

import pytest
import torch

from model import build_model, get_preset, set_mla_absorb
from model.attention import build_mask
from model.config import ModelConfig
from model.positions import apply_rope

PROMPT, DECODE, BATCH = 8, 32, 2
MOE = dict(n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2, moe_ffn_hidden_dim=32)

CASES = {
    "mha": get_preset("tiny", n_kv_heads=None),
    "gqa": get_preset("tiny"),
    "mqa": get_preset("tiny", n_kv_heads=1),
    "qk_norm_qwen3": get_preset("tiny-qwen3"),
    "sliding_window": get_preset("tiny-mistral", sliding_window=8),  # 40 tokens >> window 8
    "local_global_gemma3": get_preset("tiny-gemma3", sliding_window=8, n_layers=2, layer_types=["sliding", "full"]),
    "softcap_gemma2": get_preset("tiny-gemma2", sliding_window=8, n_layers=2, layer_types=["sliding", "full"]),
    "no_positions": get_preset("tiny", position_type="none"),
    "alibi": get_preset("tiny", position_type="alibi", n_heads=6, n_kv_heads=2, head_dim=16),
    "linear_attention": get_preset("tiny", attention_type="linear"),
    "moe": get_preset("tiny", moe=MOE),
    "mla_moe_deepseek": get_preset("tiny-deepseek_v3", n_layers=2),  # layer 0 dense, layer 1 MoE
    "mla_plain_q": get_preset("tiny-deepseek_v3", q_lora_rank=None, moe=None, mtp_depth=0, rope_scaling=None),
    "mamba2": get_preset("tiny-mamba2", mamba_chunk_size=4),  # the 8-token prompt spans 2 chunks
    "mamba2_hybrid": get_preset("tiny-mamba2-hybrid"),
}


def _model(cfg: ModelConfig, absorb: bool = False) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    set_mla_absorb(model, absorb)
    return model


@torch.no_grad()
def _incremental_logits(model: torch.nn.Module, tokens: torch.Tensor, chunks: list[int]) -> torch.Tensor:
    cache = model.init_cache(tokens.shape[0], tokens.shape[1])
    outs, start = [], 0
    for n in chunks:
        outs.append(model(tokens[:, start : start + n], cache=cache))
        start += n
        assert cache.length == start
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("name", list(CASES))
def test_prefill_then_decode_matches_full_forward(name: str) -> None:
    cfg = CASES[name]
    model = _model(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (BATCH, PROMPT + DECODE))
    with torch.no_grad():
        full = model(tokens)  # (B, T, V)
    inc = _incremental_logits(model, tokens, [PROMPT] + [1] * DECODE)
    assert (inc - full).abs().max().item() <= 1e-5


@pytest.mark.parametrize("name", ["mla_moe_deepseek", "mla_plain_q"])
def test_mla_absorbed_decode_matches_naive_full_forward(name: str) -> None:
    cfg = CASES[name]
    tokens = torch.randint(0, cfg.vocab_size, (BATCH, PROMPT + DECODE))
    with torch.no_grad():
        full = _model(cfg, absorb=False)(tokens)
        absorbed = _model(cfg, absorb=True)
        assert (absorbed(tokens) - full).abs().max().item() <= 1e-5  # absorbed without a cache too
    inc = _incremental_logits(absorbed, tokens, [PROMPT] + [1] * DECODE)
    assert (inc - full).abs().max().item() <= 1e-5


@pytest.mark.parametrize("name", ["sliding_window", "softcap_gemma2", "alibi", "mla_moe_deepseek", "linear_attention",
                                  "mamba2", "mamba2_hybrid"])
def test_chunked_prefill_matches_full_forward(name: str) -> None:
    # chunks that start mid-window exercise masks with a cache offset
    cfg = CASES[name]
    model = _model(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (BATCH, 40))
    with torch.no_grad():
        full = model(tokens)
    inc = _incremental_logits(model, tokens, [5, 11, 3, 1, 20])
    assert (inc - full).abs().max().item() <= 1e-5


def test_cache_overflow_is_an_error() -> None:
    model = _model(CASES["gqa"])
    cache = model.init_cache(1, 8)
    with torch.no_grad():
        model(torch.zeros(1, 8, dtype=torch.long), cache=cache)
        with pytest.raises(ValueError, match="cache holds 8 positions"):
            model(torch.zeros(1, 1, dtype=torch.long), cache=cache)


def test_doc_ids_with_cache_is_an_error() -> None:
    model = _model(CASES["gqa"])
    cache = model.init_cache(1, 8)
    with pytest.raises(ValueError, match="doc_ids"):
        model(torch.zeros(1, 4, dtype=torch.long), cache=cache, doc_ids=torch.zeros(1, 4, dtype=torch.long))


def test_mla_cache_holds_only_latent_and_rotated_rope_key() -> None:
    cfg = CASES["mla_plain_q"]
    model = _model(cfg)
    cache = model.init_cache(BATCH, 16)
    layer = cache[0]
    assert layer.c_kv.shape == (BATCH, 16, cfg.kv_lora_rank)
    assert layer.k_pe.shape == (BATCH, 16, cfg.qk_rope_head_dim)
    tokens = torch.randint(0, cfg.vocab_size, (BATCH, 6))
    with torch.no_grad():
        model(tokens, cache=cache)
        attn = model.layers[0].attn
        x = model.layers[0].attn_norm(model.embed_tokens(tokens))
        c_kv, k_pe = attn.kv_a_proj(x).split([cfg.kv_lora_rank, cfg.qk_rope_head_dim], dim=-1)
        positions = torch.arange(6).expand(BATCH, 6)
        cos, sin = model.rope(positions, torch.float32)
        rotated = apply_rope(k_pe.unsqueeze(2), cos, sin).squeeze(2)
    assert torch.allclose(layer.c_kv[:, :6], attn.kv_a_norm(c_kv), atol=1e-6)
    assert torch.allclose(layer.k_pe[:, :6], rotated, atol=1e-6)
    assert not torch.allclose(layer.k_pe[:, 1:6], k_pe[:, 1:6], atol=1e-3)  # stored after rotation


def test_build_mask_fast_paths_and_offsets() -> None:
    assert build_mask(0, 5, 0, 5) == (None, True)  # plain causal: sdpa's own mask
    assert build_mask(9, 1, 0, 10) == (None, False)  # decode: every cached key visible
    assert build_mask(9, 1, 6, 4, window=4) == (None, False)  # decode, keys sliced to the window
    mask, is_causal = build_mask(3, 2, 0, 5)  # chunk at slots 3, 4 over keys 0..4
    assert not is_causal
    assert mask[0, 0].int().tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    mask, _ = build_mask(0, 4, 0, 4, window=2)
    assert mask[0, 0].int().tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1]]
    mask, _ = build_mask(0, 4, 0, 4, doc_ids=torch.tensor([[0, 0, 1, 1]]))
    assert mask[0, 0].int().tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]]
