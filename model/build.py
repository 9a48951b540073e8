"""Building and initialising a model, counting its parameters and FLOPs.

- `build_model`: construct on the meta device (no memory, no wasted random init), allocate
  on the target device, then `init_weights` (the torchtitan pattern).
- `init_weights`: N(0, init_std) for every matrix (GPT-2, Radford et al. 2019) with the
  residual output projections (``o_proj``, ``down_proj``, stacked expert ``down_proj``)
  scaled by 1/sqrt(2 n_layers); norm weights 1 (Gemma's (1 + w) norms: 0); biases 0; Mamba-2
  mixers then set A, D, dt_bias and the conv as Mamba-2 does.
- `count_params`: total and active (per token) parameters.
- `flops_per_token`: training FLOPs per token, 6 N + attention (Kaplan et al. 2020;
  Hoffmann et al. 2022 appendix F; Chowdhery et al. 2022 "PaLM" appendix B).
"""
from __future__ import annotations

import math
from typing import Union

import torch
from torch import nn

from model.config import ModelConfig
from model.mamba2 import Mamba2Mixer
from model.moe import MoE, Router
from model.norms import NORM_TYPES, GemmaRMSNorm
from model.transformer import Transformer

RESIDUAL_OUTPUTS = ("o_proj", "down_proj", "out_proj")


def _leaf_name(param_name: str) -> str:
    """'layers.0.attn.o_proj.weight' -> 'o_proj'; 'layers.1.ffn.experts.down_proj' -> 'down_proj'."""
    parts = param_name.split(".")
    return parts[-2] if parts[-1] in ("weight", "bias") and len(parts) > 1 else parts[-1]


@torch.no_grad()
def init_weights(model: nn.Module, cfg: ModelConfig) -> None:
    """(Re-)initialise every parameter and buffer of ``model`` in place.

    Matrices (any parameter with >= 2 dims, nn.Linear and nn.Embedding included) ~ N(0, std),
    std = init_std, divided by sqrt(2 n_layers) for residual output projections; biases
    (any parameter named *bias*, or 1-D) 0; norm weights 1 (Gemma: 0), LayerNorm biases 0. Buffers are
    re-made by the owning module's ``reset_buffers()`` when it has one, else zero-filled
    (e.g. the MoE balancing bias). Last, each `Mamba2Mixer` re-initialises its SSM parameters.
    """
    std = cfg.init_std
    residual_std = std / math.sqrt(2 * cfg.n_layers)
    for module_name, module in model.named_modules():
        if isinstance(module, NORM_TYPES):
            nn.init.constant_(module.weight, 0.0 if isinstance(module, GemmaRMSNorm) else 1.0)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
            continue
        for name, p in module.named_parameters(recurse=False):
            if "bias" in name or p.dim() < 2:  # incl. stacked expert biases (E, hidden)
                nn.init.zeros_(p)
            else:
                residual = _leaf_name(f"{module_name}.{name}") in RESIDUAL_OUTPUTS
                nn.init.normal_(p, mean=0.0, std=residual_std if residual else std)
        if hasattr(module, "reset_buffers"):
            module.reset_buffers()
        else:
            for buf in module.buffers(recurse=False):
                buf.zero_()
    for module in model.modules():
        if isinstance(module, Mamba2Mixer):
            module.init_ssm_parameters()


def build_model(
    cfg: ModelConfig, device: Union[str, torch.device] = "cpu", dtype: torch.dtype = torch.float32
) -> Transformer:
    """A freshly initialised `Transformer` on ``device`` in ``dtype`` (initialised in fp32)."""
    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device=device)
    init_weights(model, cfg)
    return keep_fp32_modules(model.to(dtype))


def keep_fp32_modules(model: nn.Module) -> nn.Module:
    """Put MoE routers back in fp32 after a cast: routing must not depend on rounded router
    weights, and bf16 would swallow the balancing bias's small updates (as HF DeepSeek-V3's
    ``_keep_in_fp32_modules_strict``)."""
    for m in model.modules():
        if isinstance(m, Router):
            m.float()
    return model


# ---------------------------------------------------------------------------- counting


def _meta_model(model_or_cfg: Union[nn.Module, ModelConfig]) -> nn.Module:
    if isinstance(model_or_cfg, ModelConfig):
        with torch.device("meta"):
            return Transformer(model_or_cfg)
    return model_or_cfg


def count_params(model_or_cfg: Union[nn.Module, ModelConfig]) -> dict[str, int]:
    """Parameters of the main model (MTP modules reported apart, as DeepSeek-V3 does).

    ``total``: every parameter of embedding, blocks, final norm and head (a tied head is the
    embedding, counted once). ``active``: those one token uses: of each MoE layer's E routed
    experts only top-k count (shared experts and the router always). ``mtp``: the MTP modules.
    """
    model = _meta_model(model_or_cfg)
    top_k = {name: m.moe.num_experts_per_tok for name, m in model.named_modules() if isinstance(m, MoE)}
    total = active = mtp = 0
    for name, p in model.named_parameters():  # shared (tied) parameters are listed once
        n = p.numel()
        if name.startswith("mtp."):
            mtp += n
            continue
        total += n
        moe_name, is_routed, _ = name.partition(".experts.")
        if is_routed and moe_name in top_k:  # stacked routed experts: (E, ...)
            active += n * top_k[moe_name] // p.shape[0]
        else:
            active += n
    return {"total": total, "active": active, "mtp": mtp}


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs (forward + backward) per token of the main model at context ``seq_len``.

    6 N for the matmuls (2 forward, 4 backward per parameter and token), N = active parameters
    minus the input embedding table (a lookup, not a matmul; a tied table counts once, as the
    head). Plus attention scores and their weighted sum, per layer and token (PaLM app. B):
    6 * H * T_eff * (d_qk + d_v), i.e. 12 L H d T for MHA; T_eff = min(T, window) on sliding
    layers; causal masking is not discounted. Linear attention replaces it with the state
    update and read, 12 H d^2 per layer; a Mamba-2 layer's SSD scan is attention over its chunk of
    Q tokens plus writing and reading the (P, N) states, 6 H (Q (N + P) + 2 P N).
    """
    counts = count_params(cfg)
    n_matmul = counts["active"] - (0 if cfg.tie_embeddings else cfg.vocab_size * cfg.dim)
    attn = 0.0
    for i in range(cfg.n_layers):
        if cfg.layer_type(i) == "mamba":
            q = min(seq_len, cfg.mamba_chunk_size)
            n, p = cfg.mamba_state_size, cfg.mamba_head_dim
            attn += 6 * cfg.mamba_heads * (q * (n + p) + 2 * p * n)
            continue
        if cfg.attention_type == "linear":
            attn += 12 * cfg.n_heads * cfg.attn_head_dim**2
            continue
        if cfg.attention_type == "mla":
            d_qk, d_v = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim, cfg.v_head_dim
        else:
            d_qk = d_v = cfg.attn_head_dim
        t_eff = seq_len
        if cfg.layer_type(i) == "sliding":
            t_eff = min(seq_len, cfg.sliding_window)
        attn += 6 * cfg.n_heads * t_eff * (d_qk + d_v)
    return 6.0 * n_matmul + attn
