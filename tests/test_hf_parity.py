"""Hugging Face parity: our model reproduces `transformers` logits on converted weights.

For each family a tiny random `transformers` model (built from a config, no download, fp32,
eager attention) with non-trivial norm weights, biases and routing biases is saved with
``save_pretrained``, imported with `model.hf.load_hf_dir`, and run on random token sequences
longer than any sliding window: our logits must equal theirs. Then our weights are exported
with `model.hf.save_hf_dir` and ``AutoModelForCausalLM.from_pretrained`` must give the same
logits again. The CLI (`utils/convert_hf.py`) is checked end to end at the bottom.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from model import build_model  # noqa: E402
from model.hf import HFFormatError, config_from_hf, load_hf_dir, save_hf_dir  # noqa: E402
from utils.paths import REPO_ROOT  # noqa: E402

ATOL = 1e-4
VOCAB = 96
SEQ_LEN = 40  # longer than every sliding window below
SMALL = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.1)


def _config(family: str):
    """A tiny `transformers` config exercising the family's distinctive features."""
    t = transformers
    if family == "llama2":  # multi-head (no GQA), eps 1e-5, no scaling
        return t.LlamaConfig(**{**SMALL, "num_key_value_heads": 4}, rms_norm_eps=1e-5)
    if family == "llama_variants":  # biases, explicit head_dim, dynamic NTK active beyond 32 positions
        return t.LlamaConfig(**{**SMALL, "max_position_embeddings": 32}, attention_bias=True, mlp_bias=True,
                             head_dim=32, rope_scaling=dict(rope_type="dynamic", factor=2.0))
    if family == "llama3":
        scaling = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                       original_max_position_embeddings=16)
        return t.LlamaConfig(**SMALL, rope_theta=500000.0, rope_scaling=scaling, tie_word_embeddings=True)
    if family == "qwen2":
        return t.Qwen2Config(**SMALL, rope_theta=1e6)
    if family == "qwen3":
        return t.Qwen3Config(**{**SMALL, "num_hidden_layers": 3}, head_dim=32, use_sliding_window=True,
                             sliding_window=12, max_window_layers=1)
    if family == "mistral":
        return t.MistralConfig(**SMALL, sliding_window=12)
    if family == "gemma2":
        return t.Gemma2Config(**{**SMALL, "num_hidden_layers": 3}, head_dim=32, sliding_window=12,
                              query_pre_attn_scalar=24, attn_logit_softcapping=5.0, final_logit_softcapping=3.0)
    if family == "gemma3":
        return t.Gemma3TextConfig(**{**SMALL, "num_hidden_layers": 3}, head_dim=32, sliding_window=12,
                                  sliding_window_pattern=2, query_pre_attn_scalar=24, rope_theta=1e6,
                                  rope_local_base_freq=1e4, rope_scaling=dict(rope_type="linear", factor=4.0))
    if family == "deepseek_v3":
        yarn = dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=32, beta_fast=32.0,
                    beta_slow=1.0, mscale=0.707, mscale_all_dim=1.0)
        return t.DeepseekV3Config(**{**SMALL, "num_key_value_heads": 4, "num_hidden_layers": 3},
                                  moe_intermediate_size=32, n_routed_experts=8, n_shared_experts=1,
                                  num_experts_per_tok=2, n_group=4, topk_group=2, routed_scaling_factor=2.5,
                                  first_k_dense_replace=1, q_lora_rank=24, kv_lora_rank=16, qk_rope_head_dim=8,
                                  qk_nope_head_dim=16, v_head_dim=16, rope_scaling=yarn)
    if family == "deepseek_v3_variants":  # plain q_proj, attention biases, one group, 2 shared experts
        return t.DeepseekV3Config(**{**SMALL, "num_key_value_heads": 4}, moe_intermediate_size=32,
                                  n_routed_experts=4, n_shared_experts=2, num_experts_per_tok=2, n_group=1,
                                  topk_group=1, norm_topk_prob=False, first_k_dense_replace=0, q_lora_rank=None,
                                  attention_bias=True, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
                                  v_head_dim=24)
    if family == "mamba2":  # biases everywhere, 2 groups of B/C, chunks of 16 (the 40 tokens end mid-chunk)
        return t.Mamba2Config(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_heads=8, head_dim=16,
                              state_size=16, n_groups=2, chunk_size=16, use_bias=True, initializer_range=0.1)
    raise KeyError(family)


@torch.no_grad()
def _randomise(model: torch.nn.Module, seed: int) -> None:
    """Move every vector (norm weights, biases) and the routing bias away from their inits."""
    g = torch.Generator().manual_seed(seed)
    for _, p in model.named_parameters():
        if p.dim() == 1:
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    for name, b in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            b.copy_(0.1 * torch.randn(b.shape, generator=g))


def _hf_model(family: str, path: Path):
    torch.manual_seed(0)
    ref = transformers.AutoModelForCausalLM.from_config(_config(family), attn_implementation="eager")
    _randomise(ref, seed=1)
    ref.eval().save_pretrained(path)
    return ref


@torch.no_grad()
def _logits(model, tokens: torch.Tensor) -> torch.Tensor:
    out = model(tokens)
    return (out.logits if hasattr(out, "logits") else out).float()


def _close(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    assert theirs.std() > 0.1, "reference logits are too small for the comparison to mean anything"
    diff = (ours - theirs).abs().max().item()
    assert diff <= ATOL, f"max |logit diff| = {diff:.3g}"


FAST = ["llama2", "llama3", "qwen2", "qwen3", "mistral", "gemma2", "gemma3", "deepseek_v3", "mamba2"]
SLOW = ["llama_variants", "deepseek_v3_variants"]


@pytest.mark.parametrize(
    "family", FAST + [pytest.param(f, marks=pytest.mark.slow) for f in SLOW]
)
def test_logits_match_transformers_both_ways(family: str, tmp_path: Path) -> None:
    ref = _hf_model(family, tmp_path / "hf")
    cfg, sd = load_hf_dir(tmp_path / "hf")
    ours = build_model(cfg)
    ours.load_state_dict(sd, strict=True)
    ours.eval()
    tokens = torch.randint(0, VOCAB, (3, SEQ_LEN), generator=torch.Generator().manual_seed(2))
    theirs = _logits(ref, tokens)
    _close(_logits(ours, tokens), theirs)

    save_hf_dir(cfg, ours.state_dict(), tmp_path / "export")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export", attn_implementation="eager")
    _close(_logits(back.eval(), tokens), theirs)
    cfg_back, sd_back = load_hf_dir(tmp_path / "export")
    assert cfg_back == cfg
    assert all(torch.equal(sd_back[k], v) for k, v in ours.state_dict().items())


@pytest.mark.slow
def test_family_presets_export_to_transformers(tmp_path: Path) -> None:
    """Every family preset of `model.presets`, exported, gives the same logits in transformers."""
    from model import get_preset, preset_names

    tokens = torch.randint(0, 256, (2, SEQ_LEN), generator=torch.Generator().manual_seed(4))
    for name in [n for n in preset_names() if n.startswith("tiny-") and n != "tiny-mamba2-hybrid"]:
        cfg = get_preset(name, init_std=0.1)
        torch.manual_seed(0)
        ours = build_model(cfg).eval()
        _randomise(ours, seed=5)
        save_hf_dir(cfg, ours.state_dict(), tmp_path / name)
        theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / name, attn_implementation="eager")
        _close(_logits(ours, tokens), _logits(theirs.eval(), tokens))


def test_linear_context_extension_exports(tmp_path: Path) -> None:
    """An SFT context extension (linear scaling that records the pre-training length, which the
    forward pass does not use and HF has no field for) exports and gives the same logits."""
    from model import get_preset

    cfg = get_preset("tiny-llama3", init_std=0.1, max_seq_len=128,
                     rope_scaling=dict(type="linear", factor=4.0, original_max_position_embeddings=32))
    torch.manual_seed(0)
    ours = build_model(cfg).eval()
    _randomise(ours, seed=6)
    save_hf_dir(cfg, ours.state_dict(), tmp_path / "ext")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ext", attn_implementation="eager")
    tokens = torch.randint(0, 256, (1, 100), generator=torch.Generator().manual_seed(7))
    _close(_logits(ours, tokens), _logits(theirs.eval(), tokens))
    with pytest.raises(HFFormatError, match="rope_scaling"):  # dynamic does use it: HF cannot say so
        save_hf_dir(cfg.model_copy(update={"rope_scaling": cfg.rope_scaling.model_copy(update={"type": "dynamic"})}),
                    ours.state_dict(), tmp_path / "dyn")


@pytest.mark.slow
def test_deepseek_v3_compiled_logits_match_transformers(tmp_path: Path) -> None:
    """Compiled (inductor) DeepSeek-V3 gives transformers' logits: the whole forward under
    ``torch.compile`` (main stack and the MTP module; the routed-expert dispatch stays eager) and
    the blocks as ``training.compile`` compiles them (train mode, with grad). The aux-loss-free
    routing bias is moved off zero and does change the logits; transformers has no MTP, so the
    compiled MTP logits are held to our eager ones."""
    from torch._dynamo.utils import counters

    from trainer.compile import compile_blocks, uncompile_blocks

    ref = _hf_model("deepseek_v3", tmp_path / "hf")
    cfg, sd = load_hf_dir(tmp_path / "hf")
    cfg = cfg.model_copy(update={"mtp_depth": 1})
    torch.manual_seed(3)
    ours = build_model(cfg)
    missing, unexpected = ours.load_state_dict(sd, strict=False)
    assert not unexpected and missing and all(k.startswith("mtp.") for k in missing)
    ours.eval()
    tokens = torch.randint(0, VOCAB, (3, SEQ_LEN), generator=torch.Generator().manual_seed(2))
    theirs = _logits(ref, tokens)

    def forward(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # (B, T, V), (B, T - 1, V)
        hidden = ours.forward_hidden(t)  # (B, T, D)
        return ours.head(ours.norm(hidden)), ours.mtp_logits(hidden, t)[0]

    torch._dynamo.reset()
    with torch.no_grad():
        eager, eager_mtp = forward(tokens)
        compiled, compiled_mtp = torch.compile(forward)(tokens)
        biases = [b for n, b in ours.named_buffers() if n.endswith("e_score_correction_bias")]
        saved = [b.clone() for b in biases]
        for b in biases:
            b.zero_()
        unbiased = _logits(ours, tokens)
        for b, v in zip(biases, saved):
            b.copy_(v)
    _close(eager, theirs)
    _close(compiled, theirs)
    assert (unbiased - theirs).abs().max() > 100 * ATOL  # the routing bias is exercised
    assert (compiled_mtp - eager_mtp).abs().max() <= ATOL

    graphs = counters["stats"]["unique_graphs"]
    blocks = compile_blocks(ours)
    ours.train()  # dropout 0: the training forward is the eval one; the blocks run compiled with grad on
    try:
        trained = ours(tokens).detach()
    finally:
        uncompile_blocks(blocks)
    assert counters["stats"]["unique_graphs"] > graphs  # really compiled
    _close(trained, theirs)


def test_deepseek_mtp_weights_round_trip(tmp_path: Path) -> None:
    """MTP modules go out as DeepSeek's extra layer (with embed/head copies) and come back."""
    _hf_model("deepseek_v3", tmp_path / "hf")
    cfg, _ = load_hf_dir(tmp_path / "hf")
    assert cfg.mtp_depth == 0  # transformers announces an MTP layer but saves no weights for it
    cfg = cfg.model_copy(update={"mtp_depth": 1})
    ours = build_model(cfg)
    save_hf_dir(cfg, ours.state_dict(), tmp_path / "export")
    with open(tmp_path / "export" / "config.json") as f:
        assert json.load(f)["num_nextn_predict_layers"] == 1
    cfg_back, sd_back = load_hf_dir(tmp_path / "export")
    assert cfg_back.mtp_depth == 1
    assert sd_back.keys() == ours.state_dict().keys()
    assert all(torch.equal(sd_back[k], v) for k, v in ours.state_dict().items())


def test_sharded_and_fused_expert_layouts(tmp_path: Path) -> None:
    """Sharded checkpoints (index.json) and transformers-5's fused in-memory expert layout load the same."""
    from safetensors.torch import load_file

    from model.hf import state_dict_from_hf

    _hf_model("deepseek_v3", tmp_path / "hf")
    cfg, sd = load_hf_dir(tmp_path / "hf")
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    ref.save_pretrained(tmp_path / "sharded", max_shard_size="50KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    _, sd_sharded = load_hf_dir(tmp_path / "sharded")
    assert all(torch.equal(sd_sharded[k], v) for k, v in sd.items())

    raw = load_file(str(tmp_path / "hf" / "model.safetensors"))
    fused = {k: v for k, v in raw.items() if ".mlp.experts." not in k}
    for i in range(cfg.moe.first_k_dense_replace, cfg.n_layers):
        experts = range(cfg.moe.n_routed_experts)
        p = f"model.layers.{i}.mlp.experts"
        gate = torch.stack([raw[f"{p}.{j}.gate_proj.weight"] for j in experts])
        up = torch.stack([raw[f"{p}.{j}.up_proj.weight"] for j in experts])
        fused[f"{p}.gate_up_proj"] = torch.cat([gate, up], dim=1)  # (E, 2H, D)
        fused[f"{p}.down_proj"] = torch.stack([raw[f"{p}.{j}.down_proj.weight"] for j in experts])
    sd_fused = state_dict_from_hf(fused, cfg)
    assert all(torch.equal(sd_fused[k], v) for k, v in sd.items())


def test_config_fields_both_spellings() -> None:
    """Classic hub fields (rope_theta + rope_scaling with "type") and transformers-5 fields agree."""
    classic = {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2,
               "intermediate_size": 96, "vocab_size": 100, "max_position_embeddings": 256, "rope_theta": 5e5,
               "rope_scaling": {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                "original_max_position_embeddings": 64}}
    new = {k: v for k, v in classic.items() if k not in ("rope_theta", "rope_scaling")}
    new["rope_parameters"] = {**classic["rope_scaling"], "rope_type": "llama3", "rope_theta": 5e5}
    a, b = config_from_hf(classic), config_from_hf(new)
    assert a == b and a.rope_theta == 5e5 and a.rope_scaling.type == "llama3"
    gemma3_new = {"model_type": "gemma3_text", "num_hidden_layers": 4, "sliding_window": 8,
                  "layer_types": ["sliding_attention"] * 3 + ["full_attention"],
                  "rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
                                      "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6}}}
    gemma3_classic = {"model_type": "gemma3_text", "num_hidden_layers": 4, "sliding_window": 8,
                      "sliding_window_pattern": 4, "rope_theta": 1e6, "rope_local_base_freq": 1e4,
                      "rope_scaling": {"rope_type": "linear", "factor": 8.0}}
    c, d = config_from_hf(gemma3_new), config_from_hf(gemma3_classic)
    assert c == d and c.rope_local_theta == 1e4 and c.layer_types == ["sliding"] * 3 + ["full"]


@pytest.mark.parametrize(
    "hf, message",
    [
        ({"model_type": "gpt2"}, "unsupported model_type 'gpt2'"),
        ({"model_type": "llama", "hidden_act": "gelu"}, "hidden_act='gelu'"),
        ({"model_type": "llama", "rope_scaling": {"rope_type": "longrope", "factor": 2.0}}, "rope_type='longrope'"),
        ({"model_type": "qwen3", "partial_rotary_factor": 0.5}, "partial_rotary_factor"),
    ],
)
def test_unsupported_fields_are_named(hf: dict, message: str) -> None:
    with pytest.raises(HFFormatError, match=message.replace("(", r"\(")):
        config_from_hf(hf)


def test_export_refuses_what_the_family_cannot_express() -> None:
    from model import get_preset
    from model.hf import config_to_hf

    with pytest.raises(HFFormatError, match="qk_norm"):
        config_to_hf(get_preset("tiny-llama3", qk_norm=True))
    with pytest.raises(HFFormatError, match="family 'custom'"):
        config_to_hf(get_preset("tiny", family="custom"))


# ---------------------------------------------------------------- CLI
def _run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO_ROOT / "utils" / "convert_hf.py"), *args],
                          capture_output=True, text=True, cwd=REPO_ROOT, timeout=120)


def test_cli_round_trip(tmp_path: Path) -> None:
    from utils.convert_hf import main

    ref = _hf_model("qwen2", tmp_path / "hf")
    (tmp_path / "hf" / "tokenizer_config.json").write_text('{"model_max_length": 128}')
    main(["--hf_dir", str(tmp_path / "hf"), "--out", str(tmp_path / "ckpt")])
    assert (tmp_path / "ckpt" / "model.safetensors").is_file()
    assert (tmp_path / "ckpt" / "tokenizer_config.json").is_file()
    main(["--checkpoint", str(tmp_path / "ckpt"), "--to_hf", str(tmp_path / "back")])
    assert (tmp_path / "back" / "tokenizer_config.json").is_file()
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back", attn_implementation="eager")
    tokens = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(3))
    _close(_logits(back.eval(), tokens), _logits(ref, tokens))


def test_cli_bad_hf_dir_exits_2_with_one_line(tmp_path: Path) -> None:
    proc = _run_cli("--hf_dir", str(tmp_path / "missing"), "--out", str(tmp_path / "ckpt"))
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "missing" in lines[0], proc.stderr


def test_cli_unsupported_model_type_is_a_user_error(tmp_path: Path) -> None:
    from utils.convert_hf import main
    from utils.errors import UserError

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(UserError, match="unsupported model_type 'gpt2'"):
        main(["--hf_dir", str(tmp_path), "--out", str(tmp_path / "ckpt")])
