"""Causal linear attention: hand-built numbers, parallel == recurrent, document masking, GQA."""
import pytest
import torch

from model.config import ModelConfig
from model.linear_attention import LinearAttention, causal_linear_attention, feature_map
from model.positions import RotaryEmbedding, positions_from_doc_ids


def _cfg(**kw) -> ModelConfig:
    base = dict(dim=32, n_heads=4, n_kv_heads=2, attention_type="linear")
    base.update(kw)
    return ModelConfig(**base)


def _rope(cfg: ModelConfig, positions: torch.Tensor):
    return RotaryEmbedding(cfg.attn_head_dim, cfg.rope_theta, None, cfg.max_seq_len)(positions, torch.float32)


def _positions(batch: int, seq_len: int) -> torch.Tensor:
    return torch.arange(seq_len).expand(batch, seq_len)


def test_feature_maps():
    x = torch.tensor([-1.0, 0.0, 2.0])
    torch.testing.assert_close(feature_map(x, "elu"), torch.tensor([torch.e**-1, 1.0, 3.0]))
    torch.testing.assert_close(feature_map(x, "relu"), torch.tensor([0.0, 0.0, 2.0]))


def test_parallel_form_on_hand_numbers():
    phi_q = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])[None, None]  # (1, 1, 3, 2)
    phi_k = torch.tensor([[1.0, 1.0], [2.0, 0.0], [0.0, 1.0]])[None, None]
    v = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])[None, None]
    # t0 sees k0 (sim 1); t1 sees k0 (1), k1 (0); t2: sims 2, 2, 1 → (2 v0 + 2 v1 + v2) / 5
    expected = torch.tensor([[1.0, 2.0], [1.0, 2.0], [13 / 5, 18 / 5]])[None, None]
    torch.testing.assert_close(causal_linear_attention(phi_q, phi_k, v, eps=0.0), expected)


def test_module_equals_explicit_formula_for_t3():
    cfg = ModelConfig(dim=2, n_heads=1, attention_type="linear", position_type="none")
    attn = LinearAttention(cfg, 0)
    with torch.no_grad():  # identity projections: q = k = v = x
        for proj in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj):
            proj.weight.copy_(torch.eye(2))
    x = torch.tensor([[[0.0, 1.0], [1.0, 0.0], [1.0, 1.0]]])
    # phi = elu + 1 = x + 1 here: [1, 2], [2, 1], [2, 2]
    # t1: sims 4, 5 → (4 [0,1] + 5 [1,0]) / 9;  t2: sims 6, 6, 8 → [14, 14] / 20
    expected = torch.tensor([[[0.0, 1.0], [5 / 9, 4 / 9], [0.7, 0.7]]])
    torch.testing.assert_close(attn(x, None, _positions(1, 3)), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("use_rope", [False, True])
def test_parallel_equals_recurrent(use_rope):
    torch.manual_seed(0)
    cfg = _cfg()
    attn = LinearAttention(cfg, 0).eval()
    batch, seq_len = 2, 12
    x = torch.randn(batch, seq_len, cfg.dim)
    pos = _positions(batch, seq_len)
    rope = _rope(cfg, pos) if use_rope else None

    def rope_slice(a: int, b: int):
        return None if rope is None else (rope[0][:, a:b], rope[1][:, a:b])

    with torch.no_grad():
        parallel = attn(x, rope, pos)
        # token by token: the pure RNN recurrence
        state = attn.init_cache(batch, seq_len, x.device, x.dtype)
        steps = [attn(x[:, t : t + 1], rope_slice(t, t + 1), pos[:, t : t + 1], state) for t in range(seq_len)]
        # prefill 5 tokens, then decode the rest
        state2 = attn.init_cache(batch, seq_len, x.device, x.dtype)
        chunks = [attn(x[:, :5], rope_slice(0, 5), pos[:, :5], state2)]
        chunks += [attn(x[:, t : t + 1], rope_slice(t, t + 1), pos[:, t : t + 1], state2) for t in range(5, seq_len)]
    torch.testing.assert_close(torch.cat(steps, dim=1), parallel, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat(chunks, dim=1), parallel, atol=1e-5, rtol=1e-5)
    assert state.length == seq_len and state.S.shape == (batch, cfg.n_heads, 8, 8)
    torch.testing.assert_close(state.S, state2.S)


def test_doc_masking_equals_separate_documents():
    torch.manual_seed(0)
    cfg = _cfg()
    attn = LinearAttention(cfg, 0)
    doc_ids = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 2, 2, 2], [5, 5, 6, 6, 6, 6, 6, 6, 6, 6]])
    x = torch.randn(2, 10, cfg.dim)
    pos = positions_from_doc_ids(doc_ids)
    packed = attn(x, _rope(cfg, pos), pos, doc_ids=doc_ids)
    for row, bounds in ((0, [(0, 4), (4, 7), (7, 10)]), (1, [(0, 2), (2, 10)])):
        for a, b in bounds:
            p = _positions(1, b - a)
            alone = attn(x[row : row + 1, a:b], _rope(cfg, p), p)
            torch.testing.assert_close(packed[row : row + 1, a:b], alone, atol=1e-5, rtol=1e-5)
    # and without doc_ids the documents do mix
    assert not torch.allclose(attn(x, _rope(cfg, pos), pos), packed, atol=1e-3)


def test_gqa_equals_mha_with_repeated_kv_weights():
    torch.manual_seed(0)
    gqa = LinearAttention(_cfg(n_kv_heads=1), 0)
    mha = LinearAttention(_cfg(n_kv_heads=4), 0)
    with torch.no_grad():
        for name in ("q_proj", "o_proj"):
            getattr(mha, name).weight.copy_(getattr(gqa, name).weight)
        for name in ("k_proj", "v_proj"):
            getattr(mha, name).weight.copy_(getattr(gqa, name).weight.repeat(4, 1))  # every head = kv head 0
    x = torch.randn(1, 6, 32)
    pos = _positions(1, 6)
    torch.testing.assert_close(gqa(x, None, pos), mha(x, None, pos))


def test_relu_zero_denominator_stays_finite():
    attn = LinearAttention(_cfg(linear_feature_map="relu"), 0)
    with torch.no_grad():
        attn.k_proj.weight.zero_()  # phi(k) = relu(0) = 0: every denominator is 0 (+ eps)
    out = attn(torch.randn(1, 4, 32), None, _positions(1, 4))
    assert torch.equal(out, torch.zeros_like(out))


def test_cache_misuse_is_rejected():
    cfg = _cfg()
    attn = LinearAttention(cfg, 0)
    x = torch.randn(1, 3, cfg.dim)
    state = attn.init_cache(1, 4, x.device, x.dtype)
    with pytest.raises(ValueError, match="doc_ids"):
        attn(x, None, _positions(1, 3), state, doc_ids=torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="rewind"):
        attn(x, None, _positions(1, 3) + 2, state)
    attn(x, None, _positions(1, 3), state)
    with pytest.raises(ValueError, match="holds 4 positions"):
        attn(x, None, _positions(1, 3) + 3, state)
