"""trainer.optim: Newton–Schulz maths, Muon vs torch.optim.Muon / AdamW vs torch.optim.AdamW,
parameter routing, training, exact resume."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from trainer.distributed import full_optimizer_state_dict, load_full_optimizer_state_dict
from trainer.optim import Muon, build_optimizer, classify_params, muon_scale, newton_schulz, set_lr
from utils.config import TrainingConfig


# ---------------------------------------------------------------- a tiny model with the project's names
class _Experts(nn.Module):
    def __init__(self, n: int, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Parameter(torch.randn(n, hidden, dim) * 0.1)  # (E, hidden, dim)
        self.down_proj = nn.Parameter(torch.randn(n, dim, hidden) * 0.1)  # (E, dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, dim)
        h = F.silu(torch.einsum("btd,ehd->bteh", x, self.gate_proj))  # (B, T, E, hidden)
        return torch.einsum("bteh,edh->btd", h, self.down_proj) / self.gate_proj.shape[0]


class _Block(nn.Module):
    def __init__(self, dim: int, moe: bool):
        super().__init__()
        self.attn_norm = nn.RMSNorm(dim)
        self.attn = nn.Module()
        self.attn.q_proj = nn.Linear(dim, dim, bias=True)
        self.attn.o_proj = nn.Linear(dim, dim, bias=False)
        self.ffn_norm = nn.RMSNorm(dim)
        self.ffn = nn.Module()
        if moe:
            self.ffn.experts = _Experts(4, dim, 2 * dim)
        else:
            self.ffn.up_proj = nn.Linear(dim, 3 * dim, bias=False)
            self.ffn.down_proj = nn.Linear(3 * dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn.o_proj(F.silu(self.attn.q_proj(self.attn_norm(x))))
        h = self.ffn_norm(x)
        if hasattr(self.ffn, "experts"):
            return x + self.ffn.experts(h)
        return x + self.ffn.down_proj(F.silu(self.ffn.up_proj(h)))


class TinyLM(nn.Module):
    def __init__(self, vocab: int = 32, dim: int = 16, moe: bool = False, tie: bool = False):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList([_Block(dim, moe=False), _Block(dim, moe=moe)])
        self.norm = nn.RMSNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        if tie:
            self.lm_head.weight = self.embed.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:  # (B, T) → (B, T, V)
        x = self.embed(idx)
        for block in self.layers:
            x = block(x)
        return self.lm_head(self.norm(x))


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny matrices: one thread is faster and immune to OpenMP oversubscription on a busy box."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _loss(model: nn.Module, idx: torch.Tensor) -> torch.Tensor:
    logits = model(idx[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), idx[:, 1:].reshape(-1))


def _tcfg(**kw) -> TrainingConfig:
    return TrainingConfig(**kw)


# ---------------------------------------------------------------- Newton–Schulz
def _with_singular_values(shape: tuple[int, ...], lo: float, hi: float, gen: torch.Generator):
    """A (batch of) matrix G = U diag(s) Vᵀ with s log-spaced in [lo, hi]; returns G, U, s, V."""
    *batch, m, n = shape
    k = min(m, n)
    U, _ = torch.linalg.qr(torch.randn(*batch, m, k, generator=gen))  # (…, m, k)
    V, _ = torch.linalg.qr(torch.randn(*batch, n, k, generator=gen))  # (…, n, k)
    s = torch.logspace(torch.log10(torch.tensor(hi)), torch.log10(torch.tensor(lo)), k)
    return U @ torch.diag_embed(s.expand(*batch, k)) @ V.mT, U, V


@pytest.mark.parametrize("shape", [(48, 48), (24, 80), (80, 24), (3, 40, 24)])
def test_newton_schulz_band_and_singular_vectors(shape):
    gen = torch.Generator().manual_seed(0)
    G, U, V = _with_singular_values(shape, lo=0.1, hi=1.0, gen=gen)
    O = newton_schulz(G)
    assert O.shape == G.shape and O.dtype == G.dtype
    sv = torch.linalg.svdvals(O)
    # the quintic's 5-step band for normalised singular values ≥ 0.01 (checked on the scalar map)
    assert sv.min() > 0.68 and sv.max() < 1.14, (sv.min().item(), sv.max().item())
    # singular vectors are kept: Uᵀ O V is diagonal
    core = U.mT @ O @ V  # (…, k, k)
    off = core - torch.diag_embed(torch.diagonal(core, dim1=-2, dim2=-1))
    assert off.abs().max() < 1e-4


def test_newton_schulz_one_step_by_hand():
    # diag(3, 4) / ‖·‖_F = diag(0.6, 0.8); one step applies p(x) = 3.4445x − 4.7750x³ + 2.0315x⁵:
    # p(0.6) = 2.0667 − 1.0314 + 0.157969… = 1.193269, p(0.8) = 2.7556 − 2.4448 + 0.665682 = 0.976482
    out = newton_schulz(torch.diag(torch.tensor([3.0, 4.0])), steps=1)
    assert torch.allclose(out, torch.diag(torch.tensor([1.193269, 0.976482])), atol=1e-5)


def test_newton_schulz_bf16_band_and_rejects_vectors():
    gen = torch.Generator().manual_seed(1)
    G, _, _ = _with_singular_values((32, 64), lo=0.1, hi=1.0, gen=gen)
    sv = torch.linalg.svdvals(newton_schulz(G, dtype=torch.bfloat16).float())
    assert sv.min() > 0.6 and sv.max() < 1.25
    with pytest.raises(ValueError):
        newton_schulz(torch.randn(5))


def test_muon_scale():
    assert muon_scale(torch.Size([64, 16])) == 2.0  # tall: sqrt(64/16)
    assert muon_scale(torch.Size([16, 64])) == 1.0  # wide: 1
    assert muon_scale(torch.Size([8, 36, 9])) == 2.0  # stacked experts: last two dims


# ---------------------------------------------------------------- against torch's own optimizers
def test_muon_matches_torch_muon():
    """Same maths as torch.optim.Muon (which runs Newton–Schulz in bf16; we run fp32 on CPU)."""
    torch.manual_seed(0)
    ours = [nn.Parameter(torch.randn(32, 16)), nn.Parameter(torch.randn(16, 48))]
    ref = [nn.Parameter(p.detach().clone()) for p in ours]
    init = [p.detach().clone() for p in ours]
    opt = Muon([dict(params=ours, use_muon=True, lr=0.02, weight_decay=0.1, momentum=0.95, nesterov=True, ns_steps=5)])
    ref_opt = torch.optim.Muon(ref, lr=0.02, weight_decay=0.1, momentum=0.95, nesterov=True)
    for _ in range(5):
        for p, q in zip(ours, ref):
            g = torch.randn_like(p)
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        ref_opt.step()
    for p, q, p0 in zip(ours, ref, init):
        moved = (q - p0).abs().max()
        assert moved > 0.03
        assert (p - q).abs().max() < 0.03 * moved  # bf16 vs fp32 rounding only (no Nesterov: ~17%)


def test_adamw_groups_match_torch_adamw():
    torch.manual_seed(0)
    ours = [nn.Parameter(torch.randn(8, 4)), nn.Parameter(torch.randn(4))]
    ref = [nn.Parameter(p.detach().clone()) for p in ours]
    opt = Muon([
        dict(params=[ours[0]], use_muon=False, lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8),
        dict(params=[ours[1]], use_muon=False, lr=1e-2, weight_decay=0.0, betas=(0.9, 0.95), eps=1e-8),
    ])
    ref_opt = torch.optim.AdamW([
        dict(params=[ref[0]], weight_decay=0.1), dict(params=[ref[1]], weight_decay=0.0),
    ], lr=1e-2, betas=(0.9, 0.95), eps=1e-8, foreach=False)
    for _ in range(6):
        for p, q in zip(ours, ref):
            g = torch.randn_like(p)
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        ref_opt.step()
    for p, q in zip(ours, ref):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------- routing
def _names(opt: torch.optim.Optimizer, model: nn.Module) -> list[tuple[set[str], dict]]:
    by_id = {id(p): n for n, p in model.named_parameters()}
    return [({by_id[id(p)] for p in g["params"]}, g) for g in opt.param_groups]


def test_muon_routing_and_weight_decay():
    model = TinyLM(moe=True)
    opt = build_optimizer(model, _tcfg(optimizer="muon", learning_rate=1e-3, muon_learning_rate=0.02, weight_decay=0.1))
    assert isinstance(opt, Muon)
    (muon, g0), (io, g1), (nodecay, g2) = _names(opt, model)
    assert g0["use_muon"] and not g1["use_muon"] and not g2["use_muon"]
    assert muon == {
        "layers.0.attn.q_proj.weight", "layers.0.attn.o_proj.weight", "layers.0.ffn.up_proj.weight",
        "layers.0.ffn.down_proj.weight", "layers.1.attn.q_proj.weight", "layers.1.attn.o_proj.weight",
        "layers.1.ffn.experts.gate_proj", "layers.1.ffn.experts.down_proj",  # 3-D: a batch of matrices
    }
    assert io == {"embed.weight", "lm_head.weight"}
    assert nodecay == {
        "layers.0.attn_norm.weight", "layers.0.attn.q_proj.bias", "layers.0.ffn_norm.weight",
        "layers.1.attn_norm.weight", "layers.1.attn.q_proj.bias", "layers.1.ffn_norm.weight", "norm.weight",
    }
    assert (g0["lr"], g0["base_lr"], g0["weight_decay"]) == (0.02, 0.02, 0.1)
    assert (g1["lr"], g1["weight_decay"]) == (1e-3, 0.1)
    assert (g2["lr"], g2["weight_decay"]) == (1e-3, 0.0)
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))


def test_muon_routing_on_the_real_deepseek_model():
    """MLA + MoE (router, stacked experts, shared experts) + MTP, built by the model package."""
    from model import build_model, get_preset

    model = build_model(get_preset("tiny-deepseek_v3"))
    parts = {k: {n for n, _ in v} for k, v in classify_params(model).items()}
    params = dict(model.named_parameters())
    assert parts["embed_head"] == {"embed.weight", "lm_head.weight"}
    assert parts["no_decay"] == {n for n, p in params.items() if p.ndim == 1}
    assert parts["hidden"] == {n for n, p in params.items() if p.ndim >= 2} - parts["embed_head"]
    assert {"layers.1.ffn.gate.weight", "layers.2.attn.kv_b_proj.weight", "mtp.0.proj.weight"} <= parts["hidden"]
    assert sum(params[n].ndim == 3 for n in parts["hidden"]) == 9  # 3 stacked projections × (2 MoE layers + MTP)


def test_adamw_routing_tied_embeddings():
    model = TinyLM(tie=True)
    opt = build_optimizer(model, _tcfg(optimizer="adamw", learning_rate=1e-3, weight_decay=0.05))
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["fused"] and not opt.defaults["foreach"]  # CPU too
    (decay, g0), (nodecay, g1) = _names(opt, model)
    assert all(n.endswith("weight") for n in decay) and "embed.weight" in decay
    assert "lm_head.weight" not in decay  # tied: the same tensor, listed once
    assert all(model.get_parameter(n).ndim == 1 for n in nodecay)
    assert g0["weight_decay"] == 0.05 and g1["weight_decay"] == 0.0
    n_unique = len({id(p) for p in model.parameters()})
    assert len(decay) + len(nodecay) == n_unique


def test_trainable_subset_and_set_lr():
    model = TinyLM()
    only = [model.layers[1].attn.q_proj.weight, model.layers[1].attn.q_proj.bias]
    opt = build_optimizer(model, _tcfg(optimizer="muon"), trainable=only)
    assert [len(g["params"]) for g in opt.param_groups] == [1, 1]
    set_lr(opt, 0.25)
    assert [g["lr"] for g in opt.param_groups] == [0.02 * 0.25, 3e-4 * 0.25]
    with pytest.raises(ValueError, match="not parameters of the model"):
        build_optimizer(model, _tcfg(), trainable=[nn.Parameter(torch.zeros(2, 2))])


def test_muon_rejects_vectors():
    with pytest.raises(ValueError, match="matrices"):
        Muon([dict(params=[nn.Parameter(torch.zeros(3))], use_muon=True, lr=0.1, weight_decay=0.0, momentum=0.9,
                   nesterov=True, ns_steps=5)])


# ---------------------------------------------------------------- training and resume
def _train(moe: bool, muon_lr: float, steps: int = 40) -> tuple[float, float]:
    torch.manual_seed(0)
    model = TinyLM(moe=moe)
    data = torch.randint(0, 32, (8, 1))
    for _ in range(16):  # a deterministic bigram rule the model can learn: next = 5·token + 3 mod 32
        data = torch.cat([data, (5 * data[:, -1:] + 3) % 32], dim=1)  # (8, 17)
    tcfg = _tcfg(optimizer="muon", learning_rate=3e-3, muon_learning_rate=muon_lr, weight_decay=0.0)
    opt = build_optimizer(model, tcfg)
    first = _loss(model, data).item()
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = _loss(model, data)
        loss.backward()
        opt.step()
    return first, loss.item()


@pytest.mark.parametrize("moe", [False, True])
def test_muon_trains_tiny_model(moe):
    first, last = _train(moe, muon_lr=0.02)
    _, frozen_hidden = _train(moe, muon_lr=1e-9)  # control: only the AdamW groups move
    assert last < 0.35 * first, (first, last)
    assert last < 0.65 * frozen_hidden, (last, frozen_hidden)  # the Muon updates do the work


@pytest.mark.parametrize("optimizer", ["muon", "adamw"])
def test_state_dict_round_trip_gives_identical_next_step(optimizer):
    torch.manual_seed(0)
    tcfg = _tcfg(optimizer=optimizer, learning_rate=1e-2)
    batches = [torch.randint(0, 32, (4, 9)) for _ in range(4)]

    def step(model, opt, idx):
        opt.zero_grad(set_to_none=True)
        _loss(model, idx).backward()
        opt.step()

    model = TinyLM(moe=True)
    opt = build_optimizer(model, tcfg)
    for idx in batches[:3]:
        step(model, opt, idx)
    set_lr(opt, 0.5)
    weights = copy.deepcopy(model.state_dict())
    plain, by_name = copy.deepcopy(opt.state_dict()), copy.deepcopy(full_optimizer_state_dict(model, opt))
    assert "layers.1.ffn.experts.gate_proj" in by_name["state"]
    step(model, opt, batches[3])  # the uninterrupted run

    for state, how in ((plain, "plain"), (by_name, "by_name")):
        resumed = TinyLM(moe=True)
        resumed.load_state_dict(weights)
        opt2 = build_optimizer(resumed, tcfg)
        if how == "plain":
            opt2.load_state_dict(state)
        else:
            load_full_optimizer_state_dict(resumed, opt2, state)
        assert [g["lr"] for g in opt2.param_groups] == [g["lr"] for g in opt.param_groups]
        step(resumed, opt2, batches[3])
        for (n, a), b in zip(model.named_parameters(), resumed.parameters()):
            assert torch.equal(a, b), (how, n)
