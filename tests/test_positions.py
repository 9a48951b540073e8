"""RoPE (and its scalings) and ALiBi against hand-computed numbers and `transformers`."""
from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from model.config import RopeScaling
from model.positions import (
    RotaryEmbedding,
    alibi_bias,
    alibi_slopes,
    apply_rope,
    positions_from_doc_ids,
    rope_cos_sin,
    rope_inv_freq,
    yarn_softmax_mscale,
)

# ---------------------------------------------------------------------------- ALiBi


def test_alibi_slopes_power_of_two_heads() -> None:
    # 2^(-8 i / n), i = 1..n
    assert alibi_slopes(8).tolist() == [1 / 2, 1 / 4, 1 / 8, 1 / 16, 1 / 32, 1 / 64, 1 / 128, 1 / 256]
    expected_16 = [2 ** (-0.5 * i) for i in range(1, 17)]  # 2^-0.5, 2^-1, ..., 2^-8
    assert torch.allclose(alibi_slopes(16), torch.tensor(expected_16), rtol=1e-6, atol=0)


def test_alibi_slopes_non_power_of_two_heads() -> None:
    # 12 heads: the 8 slopes of n=8, then every other slope of n=16 (2^-0.5, 2^-1.5, 2^-2.5, 2^-3.5)
    expected = [1 / 2, 1 / 4, 1 / 8, 1 / 16, 1 / 32, 1 / 64, 1 / 128, 1 / 256,
                2 ** -0.5, 2 ** -1.5, 2 ** -2.5, 2 ** -3.5]
    assert torch.allclose(alibi_slopes(12), torch.tensor(expected), rtol=1e-6, atol=0)


def test_alibi_bias_is_slope_times_key_minus_query_distance() -> None:
    bias = alibi_bias(torch.tensor([0.5, 0.25]), torch.arange(3), torch.arange(3))  # (H, T, S)
    assert bias.shape == (2, 3, 3)
    assert bias[0].tolist() == [[0.0, 0.5, 1.0], [-0.5, 0.0, 0.5], [-1.0, -0.5, 0.0]]
    assert bias[1, 2].tolist() == [-0.5, -0.25, 0.0]  # last query: m * [-(i-1), ..., -1, 0]


# ---------------------------------------------------------------------------- RoPE math


def test_apply_rope_by_hand() -> None:
    # dim 2: theta_0 = 1, so position p rotates (x1, x2) by the angle p
    inv_freq, scaling = rope_inv_freq(2, 10000.0)
    assert inv_freq.tolist() == [1.0] and scaling == 1.0
    positions = torch.tensor([[0, 1, 2]])
    cos, sin = rope_cos_sin(inv_freq, positions)
    x = torch.tensor([1.0, 0.0]).expand(1, 3, 1, 2)  # (B, T, H, D)
    out = apply_rope(x, cos, sin)[0, :, 0]
    expected = torch.tensor([[1.0, 0.0], [math.cos(1), math.sin(1)], [math.cos(2), math.sin(2)]])
    assert torch.allclose(out, expected, atol=1e-6)


def test_rope_scores_depend_only_on_relative_position() -> None:
    torch.manual_seed(0)
    rope = RotaryEmbedding(16, 10000.0, None, 128)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)

    def score(m: int, n: int) -> float:
        cq, sq = rope(torch.tensor([[m]]), torch.float32)
        ck, sk = rope(torch.tensor([[n]]), torch.float32)
        return (apply_rope(q, cq, sq) * apply_rope(k, ck, sk)).sum().item()

    assert score(7, 3) == pytest.approx(score(54, 50), abs=1e-5)
    by_distance = [score(10, 10 - d) for d in range(6)]
    assert max(by_distance) - min(by_distance) > 0.01  # ... and does depend on it


def test_apply_rope_matches_transformers_at_absolute_positions() -> None:
    torch.manual_seed(0)
    hf_cfg = LlamaConfig(hidden_size=64, num_attention_heads=4, max_position_embeddings=256, rope_theta=10000.0)
    hf_rope = LlamaRotaryEmbedding(hf_cfg)
    positions = torch.tensor([[5, 6, 7, 8], [100, 101, 102, 103]])  # (B, T), different offsets per row
    q = torch.randn(2, 4, 3, 16)  # (B, T, H, D)
    k = torch.randn(2, 4, 3, 16)
    cos, sin = RotaryEmbedding(16, 10000.0, None, 256)(positions, torch.float32)
    hf_cos, hf_sin = hf_rope(q, positions)
    assert torch.allclose(cos, hf_cos, atol=1e-6) and torch.allclose(sin, hf_sin, atol=1e-6)
    hq, hk = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), hf_cos, hf_sin)  # HF: (B, H, T, D)
    assert torch.allclose(apply_rope(q, cos, sin), hq.transpose(1, 2), atol=1e-6)
    assert torch.allclose(apply_rope(k, cos, sin), hk.transpose(1, 2), atol=1e-6)


def test_positions_restart_per_document() -> None:
    doc_ids = torch.tensor([[0, 0, 0, 1, 1, 2], [3, 3, 3, 3, 3, 3]])
    assert positions_from_doc_ids(doc_ids).tolist() == [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]]
    # a shared prefix (-1) opens the row: every later document continues after it; padding (0) too
    shared = torch.tensor([[-1, -1, -1, 1, 1, 2, 2, 2, 0], [-1, 1, 2, 2, 3, 0, 0, 0, 0]])
    assert positions_from_doc_ids(shared).tolist() == [[0, 1, 2, 3, 4, 3, 4, 5, 3], [0, 1, 1, 2, 1, 1, 2, 3, 4]]


# ---------------------------------------------------------------------------- scalings vs transformers

HEAD_DIM, THETA = 32, 10000.0


def _hf(rope_parameters: dict, max_pos: int, seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    cfg = LlamaConfig(
        hidden_size=HEAD_DIM * 4, num_attention_heads=4, max_position_embeddings=max_pos,
        rope_parameters={"rope_theta": THETA, **rope_parameters},
    )
    return ROPE_INIT_FUNCTIONS[rope_parameters["rope_type"]](cfg, "cpu", seq_len=seq_len)


@pytest.mark.parametrize(
    "ours, hf, max_pos",
    [
        (dict(type="linear", factor=4.0), dict(rope_type="linear", factor=4.0), 128),
        (
            dict(type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                 original_max_position_embeddings=64),
            dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                 original_max_position_embeddings=64),
            512,
        ),
        (
            dict(type="yarn", factor=4.0, original_max_position_embeddings=64),
            dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=64),
            256,
        ),
        (  # DeepSeek-V3 style: mscale = mscale_all_dim -> attention factor 1
            dict(type="yarn", factor=40.0, original_max_position_embeddings=64, beta_fast=32.0, beta_slow=1.0,
                 mscale=1.0, mscale_all_dim=1.0),
            dict(rope_type="yarn", factor=40.0, original_max_position_embeddings=64, beta_fast=32.0, beta_slow=1.0,
                 mscale=1.0, mscale_all_dim=1.0),
            2560,
        ),
        (
            dict(type="yarn", factor=8.0, original_max_position_embeddings=64, mscale=0.707, mscale_all_dim=0.5,
                 beta_fast=16.0, beta_slow=2.0),
            dict(rope_type="yarn", factor=8.0, original_max_position_embeddings=64, mscale=0.707,
                 mscale_all_dim=0.5, beta_fast=16.0, beta_slow=2.0),
            512,
        ),
    ],
)
def test_rope_scaling_matches_transformers(ours: dict, hf: dict, max_pos: int) -> None:
    inv_freq, scaling = rope_inv_freq(HEAD_DIM, THETA, RopeScaling(**ours), max_seq_len=max_pos)
    hf_inv_freq, hf_scaling = _hf(hf, max_pos)
    assert torch.allclose(inv_freq, hf_inv_freq, rtol=1e-6, atol=0)
    assert scaling == pytest.approx(hf_scaling, rel=1e-12)


@pytest.mark.parametrize("seq_len", [None, 64, 300])
def test_dynamic_ntk_matches_transformers(seq_len: int | None) -> None:
    scaling = RopeScaling(type="dynamic", factor=2.0)
    inv_freq, attn = rope_inv_freq(HEAD_DIM, THETA, scaling, max_seq_len=128, seq_len=seq_len)
    hf_inv_freq, hf_attn = _hf(dict(rope_type="dynamic", factor=2.0), 128, seq_len=seq_len)
    assert torch.allclose(inv_freq, hf_inv_freq, rtol=1e-6, atol=0) and attn == hf_attn
    base = rope_inv_freq(HEAD_DIM, THETA)[0]
    assert torch.equal(inv_freq, base) == (seq_len is None or seq_len <= 128)  # only rescaled beyond 128


def test_dynamic_rope_rescales_from_the_current_length() -> None:
    rope = RotaryEmbedding(HEAD_DIM, THETA, RopeScaling(type="dynamic", factor=2.0), max_seq_len=128)
    short = rope(torch.arange(100)[None], torch.float32)[0]
    long = rope(torch.arange(300)[None], torch.float32)[0]
    assert torch.allclose(short, rope_cos_sin(rope_inv_freq(HEAD_DIM, THETA)[0], torch.arange(100)[None])[0])
    expected = rope_cos_sin(rope_inv_freq(HEAD_DIM, THETA, rope.scaling, 128, seq_len=300)[0], torch.arange(300)[None])
    assert torch.allclose(long, expected[0])


def test_yarn_mla_softmax_mscale() -> None:
    # DeepSeek: softmax scale *= (0.1 * mscale_all_dim * ln(factor) + 1)^2
    s = RopeScaling(type="yarn", factor=40.0, mscale=1.0, mscale_all_dim=1.0, original_max_position_embeddings=64)
    assert yarn_softmax_mscale(s) == pytest.approx((0.1 * math.log(40.0) + 1.0) ** 2)
    assert yarn_softmax_mscale(None) == 1.0
    assert yarn_softmax_mscale(RopeScaling(type="yarn", factor=4.0)) == 1.0  # mscale_all_dim unset
