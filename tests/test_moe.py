"""DeepSeekMoE: routing math by hand, dispatch vs a per-token loop, balancing, aux loss, HF parity."""
import math

import pytest
import torch
import torch.nn.functional as F

from model.config import ModelConfig, MoEConfig
from model.moe import MoE, grouped_mm_supported, moe_aux_loss, moe_load_stats, route_tokens, seq_aux_loss, update_moe_biases


def _logit(p: list[float]) -> torch.Tensor:
    p = torch.tensor(p, dtype=torch.float64)
    return torch.log(p / (1 - p))


def _cfg(**moe_kwargs) -> ModelConfig:
    moe = dict(n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, moe_ffn_hidden_dim=8,
               scoring_func="sigmoid", n_group=4, topk_group=2, routed_scaling_factor=2.5)
    moe.update(moe_kwargs)
    return ModelConfig(dim=16, n_heads=2, moe=MoEConfig(**moe))


def _sorted(weights, indices):
    order = indices.argsort(dim=-1)
    return weights.gather(-1, order), indices.gather(-1, order)


# ---------------------------------------------------------------------------- routing by hand
def test_sigmoid_routing_by_hand():
    logits = _logit([0.1, 0.6, 0.3, 0.8]).unsqueeze(0)  # sigmoid scores 0.1, 0.6, 0.3, 0.8
    w, idx, scores = route_tokens(logits, torch.zeros(4, dtype=torch.float64), top_k=2,
                                  scoring_func="sigmoid", routed_scaling_factor=2.5)
    w, idx = _sorted(w, idx)
    assert idx.tolist() == [[1, 3]]
    torch.testing.assert_close(w, torch.tensor([[0.6 / 1.4 * 2.5, 0.8 / 1.4 * 2.5]], dtype=torch.float64))
    torch.testing.assert_close(scores, torch.tensor([[0.1, 0.6, 0.3, 0.8]], dtype=torch.float64))

    # the bias makes expert 2 win (0.3 + 0.6 = 0.9 > 0.8 > 0.6) but the weights stay unbiased scores
    bias = torch.tensor([0.0, 0.0, 0.6, 0.0], dtype=torch.float64)
    w, idx, _ = route_tokens(logits, bias, top_k=2, scoring_func="sigmoid", norm_topk_prob=False)
    w, idx = _sorted(w, idx)
    assert idx.tolist() == [[2, 3]]
    torch.testing.assert_close(w, torch.tensor([[0.3, 0.8]], dtype=torch.float64))


def test_bias_never_changes_weights_of_a_fixed_selection():
    torch.manual_seed(0)
    logits = torch.randn(50, 8, dtype=torch.float64)
    w0, idx0, _ = route_tokens(logits, torch.zeros(8, dtype=torch.float64), top_k=2)
    # a bias shared by all experts shifts every choice score equally: same selection
    w1, idx1, _ = route_tokens(logits, torch.full((8,), 0.37, dtype=torch.float64), top_k=2)
    assert torch.equal(_sorted(w0, idx0)[1], _sorted(w1, idx1)[1])
    assert torch.equal(_sorted(w0, idx0)[0], _sorted(w1, idx1)[0])


def test_group_limited_sigmoid_excludes_the_best_single_expert():
    # groups of 2: {0,1} top-2 sum 1.0, {2,3} 1.4, {4,5} 1.2, {6,7} 0.2 → groups 1 and 2 eligible
    logits = _logit([0.95, 0.05, 0.7, 0.65, 0.6, 0.6, 0.1, 0.1]).unsqueeze(0)
    kw = dict(top_k=2, scoring_func="sigmoid", n_group=4, topk_group=2)
    w, idx, _ = route_tokens(logits, torch.zeros(8, dtype=torch.float64), **kw)
    w, idx = _sorted(w, idx)
    assert idx.tolist() == [[2, 3]]
    torch.testing.assert_close(w, torch.tensor([[0.7 / 1.35, 0.65 / 1.35]], dtype=torch.float64))
    # without the group limit expert 0 (0.95) would be chosen
    _, idx_free, _ = route_tokens(logits, torch.zeros(8, dtype=torch.float64), top_k=2)
    assert 0 in idx_free.tolist()[0]


def test_group_limited_softmax_scores_groups_by_max():
    logits = torch.tensor([[3.0, -3.0, 2.0, 1.9, 1.5, 1.4, 0.0, 0.0]], dtype=torch.float64)
    # max per group: 3, 2, 1.5, 0 → groups 0 and 1 (a top-2 sum would pick groups 1 and 2)
    w, idx, _ = route_tokens(logits, torch.zeros(8, dtype=torch.float64), top_k=2,
                             scoring_func="softmax", n_group=4, topk_group=2)
    w, idx = _sorted(w, idx)
    assert idx.tolist() == [[0, 2]]
    e3, e2 = math.exp(3.0), math.exp(2.0)
    torch.testing.assert_close(w, torch.tensor([[e3 / (e3 + e2), e2 / (e3 + e2)]], dtype=torch.float64))


# ---------------------------------------------------------------------------- dispatch
def _expert_by_hand(moe: MoE, e: int, x: torch.Tensor) -> torch.Tensor:
    ex = moe.experts
    h = F.silu(x @ ex.gate_proj[e].T) * (x @ ex.up_proj[e].T)
    return h @ ex.down_proj[e].T


def test_vectorised_dispatch_equals_per_token_loop():
    torch.manual_seed(0)
    moe = MoE(_cfg()).double().eval()
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    out = moe(x)
    flat = x.reshape(-1, 16)
    weights, indices, _ = moe.gate(flat)
    ref = torch.zeros_like(flat)
    for t in range(flat.shape[0]):  # the naive reference: one token, one slot at a time
        for j in range(indices.shape[1]):
            e = int(indices[t, j])
            ref[t] += weights[t, j] * _expert_by_hand(moe, e, flat[t : t + 1])[0]
    ref = ref.view_as(x) + moe.shared_experts(x)
    torch.testing.assert_close(out, ref)


def test_decode_gathered_experts_equal_the_per_token_loop():
    """Without gradients and with N*k <= E slots (decoding), each slot gathers its expert's
    matrices (`StackedExperts.gathered`, static shapes for a compiled decode step); same result."""
    torch.manual_seed(0)
    moe = MoE(_cfg()).double().eval()
    x = torch.randn(1, 4, 16, dtype=torch.float64)  # 4 tokens x top-2 = 8 slots = E
    calls = []
    moe.experts.dispatch = lambda *a: calls.append("dispatch") or type(moe.experts).dispatch(moe.experts, *a)
    with torch.no_grad():
        out = moe(x)
        assert calls == []  # the gathered path ran
        flat = x.reshape(-1, 16)
        weights, indices, _ = moe.gate(flat)
        ref = torch.zeros_like(flat)
        for t in range(flat.shape[0]):
            for j in range(indices.shape[1]):
                ref[t] += weights[t, j] * _expert_by_hand(moe, int(indices[t, j]), flat[t : t + 1])[0]
        torch.testing.assert_close(out, ref.view_as(x) + moe.shared_experts(x))
        moe(torch.randn(1, 5, 16, dtype=torch.float64))  # 10 slots > E: the sorted dispatch
        assert calls == ["dispatch"]


def test_grouped_gemm_equals_the_per_expert_loop():
    """fp32 on CPU takes torch's grouped GEMM; outputs and every gradient equal the loop's,
    with an expert that receives no token (an empty group)."""
    torch.manual_seed(0)
    moe = MoE(_cfg(n_group=1, topk_group=1)).train()
    with torch.no_grad():
        moe.gate.e_score_correction_bias[3] = -100.0  # expert 3 is never chosen
    x = torch.randn(2, 24, 16)
    assert grouped_mm_supported(x.reshape(-1, 16), moe.experts.up_proj)
    results = []
    for grouped in (True, False):
        moe.experts.grouped_gemm = grouped
        moe.zero_grad()
        xg = x.clone().requires_grad_()
        out = moe(xg)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        results.append((out.detach(), xg.grad, *(p.grad.clone() for p in moe.experts.parameters())))
    assert int(moe.tokens_per_expert[3]) == 0
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_parameter_names_and_shapes():
    moe = MoE(_cfg())
    shapes = {n: tuple(p.shape) for n, p in moe.state_dict().items()}
    assert shapes == {
        "gate.weight": (8, 16), "gate.e_score_correction_bias": (8,),
        "experts.gate_proj": (8, 8, 16), "experts.up_proj": (8, 8, 16), "experts.down_proj": (8, 16, 8),
        "shared_experts.gate_proj.weight": (8, 16), "shared_experts.up_proj.weight": (8, 16),
        "shared_experts.down_proj.weight": (16, 8),
    }
    assert MoE(_cfg(n_shared_experts=0)).shared_experts is None
    gelu = MoE(ModelConfig(dim=16, n_heads=2, ffn_type="gelu", moe=MoEConfig(moe_ffn_hidden_dim=8)))
    assert not hasattr(gelu.experts, "gate_proj") and gelu(torch.randn(1, 3, 16)).shape == (1, 3, 16)
    with pytest.raises(ValueError, match="mlp_bias"):
        MoE(ModelConfig(dim=16, n_heads=2, mlp_bias=True, moe=MoEConfig()))


def test_shared_experts_always_active():
    torch.manual_seed(0)
    moe = MoE(_cfg()).eval()
    x = torch.randn(2, 7, 16)
    before = moe(x)
    with torch.no_grad():
        moe.shared_experts.down_proj.weight.add_(0.1)
    changed = (moe(x) - before).abs().amax(dim=-1)  # (B, T)
    assert bool((changed > 1e-4).all())


# ---------------------------------------------------------------------------- balancing
def test_counts_accumulate_over_micro_batches_and_reset():
    torch.manual_seed(0)
    moe = MoE(_cfg())
    xs = [torch.randn(2, 6, 16) for _ in range(3)]
    expected = torch.zeros(8, dtype=torch.int64)
    for x in xs:
        moe(x)
        expected += torch.bincount(moe.gate(x.reshape(-1, 16))[1].reshape(-1), minlength=8)
    assert torch.equal(moe.tokens_per_expert, expected)
    assert int(expected.sum()) == 3 * 12 * 2
    moe.eval()(xs[0])  # eval forwards do not count
    assert torch.equal(moe.tokens_per_expert, expected)
    update_moe_biases(moe)
    assert int(moe.tokens_per_expert.sum()) == 0
    assert torch.equal(moe.last_tokens_per_expert, expected.float())


def test_bias_update_sign_rule_by_hand():
    moe = MoE(_cfg(n_routed_experts=4, n_group=1, topk_group=1, bias_update_speed=0.01))
    moe.tokens_per_expert = torch.tensor([10, 0, 5, 5])
    update_moe_biases(moe)  # mean load 5 → sign(5 - load) = [-1, +1, 0, 0]
    torch.testing.assert_close(moe.gate.e_score_correction_bias, torch.tensor([-0.01, 0.01, 0.0, 0.0]))


def test_balancing_evens_out_a_skewed_router():
    torch.manual_seed(0)
    moe = MoE(_cfg(n_group=1, topk_group=1, bias_update_speed=0.015, n_shared_experts=0))
    with torch.no_grad():  # a constant input feature makes the router prefer low expert ids
        moe.gate.weight.normal_(0.0, 0.3)
        moe.gate.weight[:, 0] = torch.linspace(2.0, -1.5, 8)
    router_before = moe.gate.weight.detach().clone()

    def batch(n_rows: int) -> torch.Tensor:
        x = torch.randn(n_rows, 32, 16)
        x[..., 0] = 1.0
        return x

    def max_min_ratio() -> float:  # load of the current router on a large fresh batch
        load = torch.bincount(moe.gate(batch(128).reshape(-1, 16))[1].reshape(-1), minlength=8).float()
        return float(load.max() / load.min().clamp(min=1))

    with torch.no_grad():
        before = max_min_ratio()
        for _ in range(60):
            moe(batch(4))
            update_moe_biases(moe)
        after = max_min_ratio()
    assert before > 20.0 and after < 2.0, (before, after)
    assert torch.equal(moe.gate.weight, router_before)  # only the bias moved
    stats = moe_load_stats(moe)  # the last step's counts
    assert math.isclose(sum(stats["moe//load"]), 1.0, rel_tol=1e-6) and stats["moe/cv"] < 0.5


# ---------------------------------------------------------------------------- sequence-wise aux loss
def test_seq_aux_loss_by_hand():
    scores = torch.tensor([[[0.6, 0.2], [0.3, 0.9]],  # row 0: normalised [.75 .25], [.25 .75] → P = [.5, .5]
                           [[0.5, 0.5], [0.2, 0.8]]])  # row 1: P = [.35, .65]
    indices = torch.tensor([[[0], [0]], [[1], [1]]])  # f = E/(kT) * counts: row 0 [2, 0], row 1 [0, 2]
    # L = alpha * mean_rows(sum_i f_i P_i) = 0.1 * (1.0 + 1.3) / 2
    torch.testing.assert_close(seq_aux_loss(scores, indices, alpha=0.1), torch.tensor(0.115))


def test_aux_loss_set_only_when_training_with_alpha():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 16)
    moe = MoE(_cfg(seq_aux_loss_alpha=0.01))
    moe(x)
    _, indices, scores = moe.gate(x.reshape(-1, 16))
    torch.testing.assert_close(moe.aux_loss, seq_aux_loss(scores.view(2, 5, 8), indices.view(2, 5, 2), 0.01))
    moe_aux_loss(moe).backward()
    assert moe.gate.weight.grad is not None and moe.gate.weight.grad.abs().sum() > 0
    moe.eval()(x)
    assert moe.aux_loss is None and moe_aux_loss(moe) is None
    plain = MoE(_cfg())
    plain(x)
    assert plain.aux_loss is None


# ---------------------------------------------------------------------------- Hugging Face parity
def test_matches_transformers_deepseek_v3_moe():
    from transformers.models.deepseek_v3.configuration_deepseek_v3 import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

    torch.manual_seed(0)
    moe = MoE(_cfg()).double().eval()
    with torch.no_grad():
        moe.gate.e_score_correction_bias.copy_(torch.randn(8) * 0.1)
    hf = DeepseekV3MoE(DeepseekV3Config(
        hidden_size=16, n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=8, n_shared_experts=1,
        n_group=4, topk_group=2, routed_scaling_factor=2.5, norm_topk_prob=True, hidden_act="silu",
    )).double().eval()
    sd = moe.state_dict()
    hf.load_state_dict({
        "gate.weight": sd["gate.weight"],
        "gate.e_score_correction_bias": sd["gate.e_score_correction_bias"],
        # installed transformers fuses [gate; up] per expert: gate_up_proj (E, 2H, D)
        "experts.gate_up_proj": torch.cat([sd["experts.gate_proj"], sd["experts.up_proj"]], dim=1),
        "experts.down_proj": sd["experts.down_proj"],
        **{k: v for k, v in sd.items() if k.startswith("shared_experts.")},
    })
    x = torch.randn(3, 11, 16, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(moe(x), hf(x))


# ---------------------------------------------------------------------------- data parallel
def _dp_worker(rank: int, init_file: str, results) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    moe = MoE(_cfg(n_routed_experts=4, n_group=1, topk_group=1, bias_update_speed=0.01))
    # rank 0 saw [6, 0, 1, 1], rank 1 saw [0, 0, 3, 5]: global [6, 0, 4, 6], mean 4
    moe.tokens_per_expert = torch.tensor([[6, 0, 1, 1], [0, 0, 3, 5]][rank])
    update_moe_biases(moe)
    results[rank] = moe.gate.e_score_correction_bias.tolist()
    dist.destroy_process_group()


@pytest.mark.slow
def test_update_all_reduces_counts_across_ranks(tmp_path):
    import torch.multiprocessing as mp

    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_dp_worker, args=(str(tmp_path / "init"), results), nprocs=2)
        expected = [-0.01, 0.01, 0.0, -0.01]  # sign(4 - [6, 0, 4, 6]) * 0.01 on every rank
        for rank in range(2):
            assert results[rank] == pytest.approx(expected)


def test_build_model_keeps_router_fp32_under_bf16() -> None:
    """A bf16 model still routes with fp32 router weights and an fp32 balancing bias (bf16
    would swallow the 1e-3 bias updates)."""
    from model import build_model, get_preset
    from model.moe import Router

    model = build_model(get_preset("tiny-deepseek_v3"), dtype=torch.bfloat16)
    routers = [m for m in model.modules() if isinstance(m, Router)]
    assert routers and all(r.weight.dtype == torch.float32 for r in routers)
    assert all(r.e_score_correction_bias.dtype == torch.float32 for r in routers)
    assert model.embed.weight.dtype == torch.bfloat16
