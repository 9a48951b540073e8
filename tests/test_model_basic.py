"""Model construction, parameter counts, document masking, tied embeddings, MTP, config errors."""
from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from model import ModelConfig, Transformer, build_model, count_params, flops_per_token, get_preset
from model.norms import GemmaRMSNorm, RMSNorm

MOE = dict(n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2, moe_ffn_hidden_dim=32)

# ---------------------------------------------------------------------------- document masking

DOC_CASES = {
    "gqa": get_preset("tiny"),
    "sliding_window": get_preset("tiny-mistral", sliding_window=4),
    "alibi": get_preset("tiny", position_type="alibi"),
    "softcap_gemma2": get_preset("tiny-gemma2", sliding_window=4),
    "mla_moe": get_preset("tiny-deepseek_v3"),
    "linear_attention": get_preset("tiny", attention_type="linear"),
    "mamba2": get_preset("tiny-mamba2", mamba_chunk_size=4),  # documents end mid-chunk and across chunks
    "mamba2_hybrid": get_preset("tiny-mamba2-hybrid", mamba_chunk_size=8),
}


@pytest.mark.parametrize("name", list(DOC_CASES))
def test_packed_documents_equal_separate_forwards(name: str) -> None:
    cfg = DOC_CASES[name]
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    lengths = [[5, 7, 4], [9, 7]]
    doc_ids = torch.tensor([sum(([d] * n for d, n in enumerate(row)), []) for row in lengths])  # (2, 16)
    tokens = torch.randint(0, cfg.vocab_size, doc_ids.shape)
    with torch.no_grad():
        packed = model(tokens, doc_ids=doc_ids)  # positions restart per document by default
        for b, row in enumerate(lengths):
            start = 0
            for n in row:
                alone = model(tokens[b : b + 1, start : start + n])
                assert (packed[b, start : start + n] - alone[0]).abs().max().item() <= 1e-5
                start += n


@pytest.mark.parametrize("name", [n for n in DOC_CASES if not n.startswith("mamba2")])
def test_shared_prefix_rows_equal_separate_forwards(name: str) -> None:
    """A prompt once, then its completions as documents that see it (doc id -1 = SHARED_PREFIX,
    positions continuing after the prompt): every token's logits equal those of ``prompt +
    completion`` alone. The window (4 < the prompt's 6) and ALiBi count in positions."""
    cfg = DOC_CASES[name]
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    prompt_len, completions = 6, [4, 3, 5]
    row = [-1] * prompt_len + sum(([j] * n for j, n in enumerate(completions, 1)), [])
    doc_ids = torch.tensor([row, [-1] * 3 + [1] * 2 + [0] * (len(row) - 5)])  # (2, 18); row 2 ends in padding
    tokens = torch.randint(0, cfg.vocab_size, doc_ids.shape)
    with torch.no_grad():
        packed = model(tokens, doc_ids=doc_ids)  # positions from the doc ids: completions continue the prompt
        for b, (p, lengths) in enumerate([(prompt_len, completions), (3, [2])]):
            start = p
            for n in lengths:
                alone = model(torch.cat([tokens[b, :p], tokens[b, start:start + n]])[None])[0]  # (p + n, V)
                assert (packed[b, :p] - alone[:p]).abs().max().item() <= 1e-5
                assert (packed[b, start:start + n] - alone[p:]).abs().max().item() <= 1e-5
                start += n


def test_a_shared_prefix_is_refused_by_mamba2() -> None:
    model = build_model(DOC_CASES["mamba2"])
    with pytest.raises(ValueError, match="shared prefix"):
        model(torch.zeros(1, 6, dtype=torch.long), doc_ids=torch.tensor([[-1, -1, 1, 1, 2, 2]]))


# ---------------------------------------------------------------------------- counting


def test_param_count_by_hand() -> None:
    cfg = get_preset("tiny")  # vocab 256, dim 64, 2 layers, 4 heads of 16, 2 kv heads, ffn 172, untied
    embed = 256 * 64
    attn = 64 * 64 + 64 * 32 + 64 * 32 + 64 * 64  # q, k, v (2 kv heads x 16), o
    ffn = 3 * 64 * 172  # gate, up, down
    block = attn + ffn + 2 * 64  # + attn_norm, ffn_norm
    total = embed + 2 * block + 64 + 256 * 64  # + final norm + lm_head
    assert total == 123_712
    assert count_params(cfg) == {"total": total, "active": total, "mtp": 0}
    assert count_params(build_model(cfg)) == count_params(cfg)  # same from a built model


def test_moe_active_params_count_top_k_routed_experts() -> None:
    cfg = get_preset("tiny", moe=dict(MOE, first_k_dense_replace=1))  # layer 0 dense, layer 1 MoE
    dense = count_params(get_preset("tiny"))["total"]
    ffn = 3 * 64 * 172
    routed = 4 * 3 * 64 * 32  # 4 experts x (gate, up, down) of 64 x 32
    shared = 3 * 64 * 32
    router = 4 * 64
    counts = count_params(cfg)
    assert counts["total"] == dense - ffn + routed + shared + router
    assert counts["active"] == dense - ffn + routed * 2 // 4 + shared + router


def test_flops_per_token_by_hand() -> None:
    cfg = get_preset("tiny")
    n = count_params(cfg)["active"] - 256 * 64  # the input embedding is a lookup, not a matmul
    attention = 2 * 12 * 4 * 16 * 128  # 12 L H d T with L = 2, H = 4, d = 16, T = 128
    assert flops_per_token(cfg, 128) == 6 * n + attention
    windowed = get_preset("tiny", sliding_window=32)
    assert flops_per_token(windowed, 128) == 6 * n + 2 * 12 * 4 * 16 * 32


# ---------------------------------------------------------------------------- construction


def test_meta_build_and_init() -> None:
    cfg = get_preset("bench-A", qkv_bias=True, moe=dict(MOE, first_k_dense_replace=3))
    torch.manual_seed(0)
    model = build_model(cfg)
    for name, p in model.named_parameters():
        assert p.device.type == "cpu" and p.dtype == torch.float32 and torch.isfinite(p).all(), name
    std, residual_std = 0.02, 0.02 / math.sqrt(2 * cfg.n_layers)
    attn = model.layers[0].attn
    assert attn.q_proj.weight.std().item() == pytest.approx(std, rel=0.05)
    assert attn.o_proj.weight.std().item() == pytest.approx(residual_std, rel=0.05)
    assert model.layers[0].ffn.down_proj.weight.std().item() == pytest.approx(residual_std, rel=0.05)
    assert model.layers[3].ffn.experts.down_proj.std().item() == pytest.approx(residual_std, rel=0.05)
    assert model.layers[3].ffn.experts.up_proj.std().item() == pytest.approx(std, rel=0.05)
    assert model.embed.weight.std().item() == pytest.approx(std, rel=0.05)
    assert torch.all(attn.q_proj.bias == 0)
    assert torch.all(build_model(get_preset("tiny", mlp_bias=True)).layers[0].ffn.up_proj.bias == 0)
    assert torch.all(model.layers[3].ffn.gate.e_score_correction_bias == 0)
    assert torch.all(model.norm.weight == 1)
    gemma = build_model(get_preset("tiny-gemma2"))
    gemma_norms = [m for m in gemma.modules() if isinstance(m, GemmaRMSNorm)]
    assert gemma_norms and all(torch.all(m.weight == 0) for m in gemma_norms)
    assert not any(isinstance(m, RMSNorm) for m in gemma.modules())


def test_build_in_bf16_and_embedding_scale_in_embedding_dtype() -> None:
    cfg = get_preset("tiny-gemma2", dim=48, n_heads=4, n_kv_heads=2)  # sqrt(48) = 6.928... -> bf16 6.9375
    model = build_model(cfg, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    tokens = torch.tensor([[1, 2, 3]])
    expected = model.embed.weight[tokens] * torch.tensor(6.9375, dtype=torch.bfloat16)
    assert torch.equal(model.embed_tokens(tokens), expected)
    assert model(tokens).dtype == torch.bfloat16


def test_tied_embeddings() -> None:
    cfg = get_preset("tiny", tie_embeddings=True)
    model = build_model(cfg)
    names = set(model.state_dict())
    assert "lm_head.weight" not in names and "embed.weight" in names
    assert count_params(cfg)["total"] == count_params(get_preset("tiny"))["total"] - 256 * 64
    tokens = torch.randint(0, 256, (2, 5))
    with torch.no_grad():
        hidden = model.norm(model.forward_hidden(tokens))
        assert torch.allclose(model(tokens), hidden @ model.embed.weight.T, atol=1e-6)


def test_parameter_names_follow_the_contract() -> None:
    names = set(build_model(get_preset("tiny-gemma2")).state_dict())
    for n in ["embed.weight", "norm.weight", "layers.0.attn_norm.weight", "layers.0.post_attn_norm.weight",
              "layers.0.ffn_norm.weight", "layers.0.post_ffn_norm.weight", "layers.0.attn.q_proj.weight",
              "layers.0.ffn.gate_proj.weight", "layers.0.ffn.down_proj.weight"]:
        assert n in names, n
    names = set(build_model(get_preset("tiny-deepseek_v3")).state_dict())
    for n in ["layers.0.attn.q_a_proj.weight", "layers.0.attn.q_a_norm.weight", "layers.0.attn.q_b_proj.weight",
              "layers.0.attn.kv_a_proj.weight", "layers.0.attn.kv_a_norm.weight", "layers.0.attn.kv_b_proj.weight",
              "layers.0.attn.o_proj.weight", "layers.1.ffn.gate.weight", "layers.1.ffn.gate.e_score_correction_bias",
              "layers.1.ffn.experts.gate_proj", "layers.1.ffn.shared_experts.up_proj.weight", "lm_head.weight",
              "mtp.0.enorm.weight", "mtp.0.hnorm.weight", "mtp.0.proj.weight", "mtp.0.block.attn.kv_b_proj.weight",
              "mtp.0.norm.weight"]:
        assert n in names, n


def test_mtp_logits_shapes_and_gradients() -> None:
    cfg = get_preset("tiny-deepseek_v3", mtp_depth=2)
    model = build_model(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (2, 12))
    hidden = model.forward_hidden(tokens)
    assert hidden.shape == (2, 12, cfg.dim)
    outs = model.mtp_logits(hidden, tokens)
    assert [tuple(o.shape) for o in outs] == [(2, 11, cfg.vocab_size), (2, 10, cfg.vocab_size)]
    sum(o.sum() for o in outs).backward()
    assert model.mtp[1].proj.weight.grad is not None and model.embed.weight.grad is not None
    assert model.layers[0].attn.kv_b_proj.weight.grad is not None  # flows back into the main model
    # MTP params are reported apart from the main model's
    counts = count_params(cfg)
    assert counts["mtp"] == sum(p.numel() for n, p in model.named_parameters() if n.startswith("mtp."))


def test_moe_aux_loss_is_collected() -> None:
    cfg = get_preset("tiny", moe=dict(MOE, seq_aux_loss_alpha=0.01))
    model = build_model(cfg).train()
    model(torch.randint(0, 256, (2, 8)))
    aux = model.aux_loss()
    assert aux is not None and aux.ndim == 0 and aux.item() > 0
    assert build_model(get_preset("tiny")).aux_loss() is None


def test_default_positions_follow_the_cache() -> None:
    model = build_model(get_preset("tiny")).eval()
    tokens = torch.randint(0, 256, (1, 6))
    cache = model.init_cache(1, 16)
    with torch.no_grad():
        model(tokens, cache=cache)
        assert cache.length == 6
        explicit = model(tokens[:, :2], positions=torch.tensor([[6, 7]]), cache=cache)
        assert cache.length == 8
        cache2 = model.init_cache(1, 16)
        model(tokens, cache=cache2)
        default = model(tokens[:, :2], cache=cache2)
    assert torch.equal(explicit, default)


# ---------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(n_heads=8, n_kv_heads=3), "n_heads=8 must be divisible by n_kv_heads=3"),
        (dict(attention_type="mla", position_type="alibi"), "attention_type=mla needs position_type=rope"),
        (dict(dim=65, n_heads=4), "dim=65 must be divisible by n_heads=4"),
        (dict(n_layers=2, layer_types=["full", "sliding"]), "sliding_window is not set"),
    ],
)
def test_config_validation_errors(fields: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        ModelConfig(**fields)


def test_unknown_preset_names_the_choices() -> None:
    with pytest.raises(ValueError, match="unknown model preset 'nope'.*tiny-llama3"):
        get_preset("nope")


def test_every_preset_builds_on_meta() -> None:
    from model.presets import preset_names

    for name in preset_names():
        with torch.device("meta"):
            model = Transformer(get_preset(name))
        assert count_params(model)["total"] > 0
    assert 45e6 < count_params(get_preset("llama-50m"))["total"] < 55e6


# ---------------------------------------------------------------------------- attention kernel paths
@pytest.mark.parametrize("n_heads,n_kv", [(8, 2), (4, 1), (6, 3)])
def test_decode_attention_with_shared_kv_heads_equals_repeated_kv(n_heads: int, n_kv: int) -> None:
    """`attend` folds the query heads of a kv group into query rows at T = 1 (GQA / MQA / absorbed
    MLA decoding); the result must equal plain attention over K/V repeated per head, with a
    per-row padding mask as the paged engine builds it."""
    from model.attention import attend

    torch.manual_seed(0)
    batch, seq, d, dv = 3, 7, 16, 12
    q = torch.randn(batch, n_heads, 1, d)
    k, v = torch.randn(batch, n_kv, seq, d), torch.randn(batch, n_kv, seq, dv)
    lengths = torch.tensor([7, 4, 1])
    mask = (torch.arange(seq)[None, :] < lengths[:, None])[:, None, None, :]  # (B, 1, 1, S)
    group = n_heads // n_kv
    k_rep, v_rep = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)  # (B, H, S, .)
    scores = (q @ k_rep.transpose(-1, -2)) * 0.3  # (B, H, 1, S)
    expected = scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v_rep  # (B, H, 1, dv)
    out = attend(q, k, v, 0.3, mask)
    assert out.shape == (batch, n_heads, 1, dv)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(attend(q, k, v, 0.3), (scores.softmax(-1) @ v_rep), atol=1e-6, rtol=1e-5)
