"""LoRA (Hu et al. 2021) and QLoRA (Dettmers et al. 2023) on the model package.

The formula by hand, zero-initialised B, gradients only in the adapters, exact merge/unmerge,
cached decoding (MHA and MLA's absorbed path) with adapters on, adapter files in PEFT's layout
(and, when ``peft`` is installed, loaded by PEFT onto the equivalent transformers model), the
ways of choosing targets, and a tiny QLoRA model whose loss falls.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pydantic
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from model import build_model, get_preset, set_mla_absorb
from model.lora import (
    LoraConfig,
    LoraExperts,
    LoraLinear,
    apply_lora,
    lora_candidates,
    lora_modules,
    lora_parameters,
    merge_lora,
    unmerge_lora,
)
from model.lora_io import load_adapter, merged_state_dict, save_adapter
from model.qlinear import NF4Linear, quantize_model

PRESETS = {
    "llama": get_preset("tiny-llama3", n_layers=2),
    "deepseek": get_preset("tiny-deepseek_v3", mtp_depth=0),  # MLA with q_lora + MoE with shared experts
}


def _model(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(PRESETS[name]).eval()


@torch.no_grad()
def _randomise_adapters(model: nn.Module, seed: int = 1) -> None:
    """Non-zero B everywhere, so every adapter changes the output (a missed one would show)."""
    g = torch.Generator().manual_seed(seed)
    for p in lora_parameters(model):
        p.copy_(0.1 * torch.randn(p.shape, generator=g))


def _tokens(name: str, batch: int = 2, length: int = 12, seed: int = 2) -> torch.Tensor:
    return torch.randint(0, PRESETS[name].vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------- the formula
def test_formula_by_hand() -> None:
    base = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        base.weight.copy_(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    layer = LoraLinear(base, r=1, alpha=2.0, dropout=0.0)  # scaling alpha / r = 2
    with torch.no_grad():
        layer.lora_A.weight.copy_(torch.tensor([[1.0, 0.0]]))
        layer.lora_B.weight.copy_(torch.tensor([[1.0], [2.0]]))
    x = torch.tensor([[1.0, 1.0]])
    # W x = [3, 7]; A x = 1; B A x = [1, 2]; out = [3 + 2*1, 7 + 2*2]
    assert layer(x).tolist() == [[5.0, 11.0]]
    assert layer.weight.tolist() == [[3.0, 2.0], [7.0, 4.0]]  # W + 2 B A
    layer.merge()
    assert base.weight.tolist() == [[3.0, 2.0], [7.0, 4.0]] and layer(x).tolist() == [[5.0, 11.0]]
    layer.unmerge()
    assert base.weight.tolist() == [[1.0, 2.0], [3.0, 4.0]]


def test_init_b_zero_output_unchanged_a_like_peft() -> None:
    model = _model("deepseek")
    tokens = _tokens("deepseek")
    with torch.no_grad():
        before = model(tokens)
        apply_lora(model, LoraConfig(r=4, alpha=8))
        after = model(tokens)
    assert torch.equal(before, after)
    for _, m in lora_modules(model):
        for name, t in m.adapter_tensors().items():
            if "lora_B" in name:
                assert not t.any()
            else:  # Kaiming-uniform(a = sqrt(5)): U(-1/sqrt(in), 1/sqrt(in))
                bound = 1 / math.sqrt(t.shape[-1])
                assert t.abs().max() <= bound and t.abs().max() > 0.5 * bound


def test_dropout_acts_only_on_the_lora_path_in_training() -> None:
    torch.manual_seed(0)
    layer = LoraLinear(nn.Linear(16, 8), r=4, alpha=4.0, dropout=0.5)
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(32, 16)
    layer.train()
    assert not torch.allclose(layer(x), layer(x))  # a fresh mask per call
    layer.eval()
    assert torch.allclose(layer(x), layer.base_layer(x) + 1.0 * layer.lora_B(layer.lora_A(x)), atol=1e-6)


def test_only_adapters_get_gradients() -> None:
    model = _model("deepseek").train()
    apply_lora(model, LoraConfig(r=4, alpha=8, dropout=0.1))
    adapters = {id(p) for p in lora_parameters(model)}
    assert {id(p) for p in model.parameters() if p.requires_grad} == adapters
    logits = model(_tokens("deepseek"))
    F.cross_entropy(logits.flatten(0, 1), _tokens("deepseek", seed=3).flatten()).backward()
    for name, p in model.named_parameters():
        if id(p) in adapters:
            assert p.grad is not None, name
        else:
            assert p.grad is None, name
    assert all(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n and "experts" not in n)


# ---------------------------------------------------------------------------- merge / decode
@pytest.mark.parametrize("name", list(PRESETS))
def test_merge_and_unmerge_are_exact(name: str) -> None:
    model = apply_lora(_model(name), LoraConfig(r=4, alpha=8))
    _randomise_adapters(model)
    tokens = _tokens(name)
    weights = {k: v.clone() for k, v in model.state_dict().items() if "lora" not in k}
    with torch.no_grad():
        adapted = model(tokens)
        base = _model(name)(tokens)
        assert (adapted - base).abs().max() > 1e-2  # the adapters matter
        merge_lora(model)
        assert (model(tokens) - adapted).abs().max() <= 1e-5
        unmerge_lora(model)
        assert (model(tokens) - adapted).abs().max() <= 1e-5
    for k, v in model.state_dict().items():
        if "lora" not in k:
            assert torch.allclose(v, weights[k], atol=1e-6), k


def _decode(model: nn.Module, tokens: torch.Tensor, prompt: int) -> torch.Tensor:
    cache = model.init_cache(tokens.shape[0], tokens.shape[1])
    outs = [model(tokens[:, :prompt], cache=cache)]
    outs += [model(tokens[:, t : t + 1], cache=cache) for t in range(prompt, tokens.shape[1])]
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("name,absorb,quantize", [
    ("llama", False, False), ("deepseek", True, False), ("deepseek", True, True),
])
@torch.no_grad()
def test_cached_decoding_with_adapters_equals_full_forward(name: str, absorb: bool, quantize: bool) -> None:
    """MLA's absorbed path reads kv_b_proj.weight: it must see the adapted (and dequantised) weight."""
    model = _model(name)
    if quantize:
        quantize_model(model)
    apply_lora(model, LoraConfig(r=4, alpha=8))
    _randomise_adapters(model)
    tokens = _tokens(name, length=14)
    full = model(tokens)
    set_mla_absorb(model, absorb)
    assert (_decode(model, tokens, prompt=6) - full).abs().max() <= 1e-5


# ---------------------------------------------------------------------------- files
def test_save_load_round_trip_with_peft_names(tmp_path: Path) -> None:
    model = apply_lora(_model("deepseek"), LoraConfig(r=4, alpha=8, dropout=0.05))
    _randomise_adapters(model)
    save_adapter(model, tmp_path, base_model_path="runs/base")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert {k: config[k] for k in ("peft_type", "task_type", "r", "lora_alpha", "lora_dropout", "bias",
                                   "base_model_name_or_path")} == {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8.0, "lora_dropout": 0.05,
        "bias": "none", "base_model_name_or_path": "runs/base"}
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert tensors["base_model.model.layers.0.attn.kv_b_proj.lora_A.weight"].shape == (4, 32)
    assert tensors["base_model.model.layers.0.attn.kv_b_proj.lora_B.weight"].shape == (4 * (32 + 32), 4)
    assert tensors["base_model.model.layers.1.ffn.experts.down_proj.lora_A.weight"].shape == (8, 4, 32)
    assert all(k.startswith("base_model.model.") and k.endswith((".lora_A.weight", ".lora_B.weight"))
               for k in tensors)
    assert "layers.0.attn.q_a_proj" in config["target_modules"]

    tokens = _tokens("deepseek")
    with torch.no_grad():
        expected = model(tokens)
        fresh = load_adapter(_model("deepseek"), tmp_path)  # adds the adapters, then loads them
        assert torch.equal(fresh(tokens), expected)
    assert {id(p) for p in fresh.parameters() if p.requires_grad} == {id(p) for p in lora_parameters(fresh)}
    with pytest.raises(ValueError, match="shape"):
        load_adapter(apply_lora(_model("deepseek"), LoraConfig(r=2)), tmp_path)
    with pytest.raises(FileNotFoundError):
        load_adapter(_model("deepseek"), tmp_path / "missing")


def test_merged_state_dict_is_a_plain_checkpoint() -> None:
    for quantize in (False, True):
        model = _model("deepseek")
        if quantize:
            quantize_model(model)
        apply_lora(model, LoraConfig(r=4, alpha=8))
        _randomise_adapters(model)
        tokens = _tokens("deepseek")
        plain = build_model(PRESETS["deepseek"]).eval()
        plain.load_state_dict(merged_state_dict(model), strict=True)
        with torch.no_grad():
            assert (plain(tokens) - model(tokens)).abs().max() <= 1e-5


# ---------------------------------------------------------------------------- targets
def _targets(name: str, config: LoraConfig) -> set[str]:
    model = apply_lora(_model(name), config)
    paths = set()
    for path, m in lora_modules(model):
        paths |= {f"{path}.{n}" for n in m.names} if isinstance(m, LoraExperts) else {path}
    return paths


def test_auto_targets_every_attention_and_ffn_linear() -> None:
    got = _targets("deepseek", LoraConfig())
    layer0 = {f"layers.0.attn.{p}" for p in ("q_a_proj", "q_b_proj", "kv_a_proj", "kv_b_proj", "o_proj")}
    layer0 |= {f"layers.0.ffn.{p}" for p in ("gate_proj", "up_proj", "down_proj")}
    projs = ("gate_proj", "up_proj", "down_proj")
    layer1_ffn = {f"layers.1.ffn.{e}.{p}" for e in ("experts", "shared_experts") for p in projs}
    assert layer0 <= got and layer1_ffn <= got
    assert not any("lm_head" in p or p.endswith(".gate") for p in got)  # head and router are left alone
    assert len(got) == 8 + 5 * 2 + 6 * 2  # dense layer 0, then attention + experts + shared experts per MoE layer


def test_name_and_regex_targets() -> None:
    assert _targets("llama", LoraConfig(target_modules=["q_proj", "v_proj"])) == {
        f"layers.{i}.attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")}
    assert _targets("deepseek", LoraConfig(target_modules=["experts.up_proj"])) == {
        "layers.1.ffn.experts.up_proj", "layers.2.ffn.experts.up_proj"}
    assert _targets("llama", LoraConfig(target_modules=["lm_head"])) == {"lm_head"}
    assert _targets("llama", LoraConfig(target_modules=["q_proj"], target_regex=r"layers\.1\.ffn\.\w+_proj")) == {
        "layers.1.ffn.gate_proj", "layers.1.ffn.up_proj", "layers.1.ffn.down_proj"}
    with pytest.raises(ValueError, match="'wq' matches no linear layer"):
        apply_lora(_model("llama"), LoraConfig(target_modules=["wq"]))
    with pytest.raises(ValueError, match="matches no linear layer"):
        apply_lora(_model("llama"), LoraConfig(target_regex=r"attn\.q_proj"))  # must match the whole path
    with pytest.raises(pydantic.ValidationError, match="regular expression"):
        LoraConfig(target_regex="layers.(")
    model = apply_lora(_model("llama"), LoraConfig())
    with pytest.raises(ValueError, match="already has LoRA"):
        apply_lora(model, LoraConfig())
    assert "layers.0.ffn.up_proj" in lora_candidates(_model("llama"))


# ---------------------------------------------------------------------------- QLoRA
def test_qlora_tiny_model_trains() -> None:
    model = quantize_model(_model("llama"))
    assert isinstance(model.layers[0].attn.q_proj, NF4Linear)
    apply_lora(model, LoraConfig(r=8, alpha=16))
    packed = model.layers[0].attn.q_proj.base_layer.qweight.packed.clone()
    model.train()
    opt = torch.optim.AdamW(lora_parameters(model), lr=1e-2)
    tokens = _tokens("llama", batch=4, length=33, seed=5)
    losses = []
    for _ in range(6):
        logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.2, losses
    assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n)
    assert torch.equal(model.layers[0].attn.q_proj.base_layer.qweight.packed, packed)  # the base never moves
    with pytest.raises(ValueError, match="4-bit"):
        merge_lora(model)


# ---------------------------------------------------------------------------- PEFT
PEFT_CASES = {
    "llama": LoraConfig(r=4, alpha=8),  # auto: attention and MLP
    # MLA projections, q_b_proj / kv_a_proj with the RoPE rows reordered for transformers
    "deepseek": LoraConfig(r=4, alpha=8, target_regex=r"layers\.\d+\.attn\.\w+"),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(PEFT_CASES))
def test_peft_loads_our_adapter_onto_the_transformers_model(name: str, tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    from model.hf import save_hf_dir

    model = _model(name)
    save_hf_dir(PRESETS[name], model.state_dict(), tmp_path / "base")
    apply_lora(model, PEFT_CASES[name])
    _randomise_adapters(model)
    save_adapter(model, tmp_path / "adapter", base_model_path=str(tmp_path / "base"), hf_names=True)
    tensors = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert all(k.startswith("base_model.model.model.layers.") for k in tensors)

    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base", attn_implementation="eager")
    theirs = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    tokens = _tokens(name)
    with torch.no_grad():
        ours = model(tokens)
        assert (ours - _model(name)(tokens)).abs().max() > 1e-2  # the adapters matter
        assert (theirs(tokens).logits - ours).abs().max() <= 1e-4


@pytest.mark.parametrize("name", list(PEFT_CASES))
def test_an_adapter_in_transformers_names_loads_back_onto_ours(name: str, tmp_path: Path) -> None:
    """A PEFT adapter written for the exported model (what PEFT users have) loads onto ours and
    gives the same model as the adapter in our names."""
    model = _model(name)
    apply_lora(model, PEFT_CASES[name])
    _randomise_adapters(model)
    save_adapter(model, tmp_path / "hf_named", hf_names=True)
    loaded = load_adapter(_model(name), tmp_path / "hf_named")
    tokens = _tokens(name)
    with torch.no_grad():
        assert (model(tokens) - _model(name)(tokens)).abs().max() > 1e-2  # the adapters matter
        assert (loaded(tokens) - model(tokens)).abs().max() <= 1e-5
