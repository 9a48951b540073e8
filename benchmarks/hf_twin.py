"""The `transformers` twin of one of our models, for the benchmarks: the same weights, loaded by
Hugging Face's own ``from_pretrained``.

Our state dict goes out through `model.hf.save_hf_dir` (the converter `tests/test_hf_parity.py`
checks against transformers' logits) and comes back as the family's ``*ForCausalLM`` (Llama,
DeepSeek-V3, ...) with sdpa attention in fp32; ``from_pretrained`` fuses MoE experts into its
own layout, run by ``experts`` ("grouped_mm", transformers' default, or "eager": its loop).
`mla_moe_shape` names the shape of a DeepSeek-V3 style config in the reports.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn as nn

from model.config import ModelConfig
from model.hf import save_hf_dir


def load_hf_twin(cfg: ModelConfig, directory: Union[str, os.PathLike], experts: Optional[str] = None) -> nn.Module:
    """The transformers model saved in ``directory`` (sdpa attention, fp32; MoE experts run by
    ``experts``, None: transformers' default), in eval mode."""
    import transformers

    kwargs = {"experts_implementation": experts} if cfg.moe is not None and experts is not None else {}
    return transformers.AutoModelForCausalLM.from_pretrained(
        directory, attn_implementation="sdpa", dtype=torch.float32, **kwargs).eval()


def save_twin_dir(cfg: ModelConfig, ours: nn.Module, directory: Union[str, os.PathLike]) -> Path:
    """Write ``ours`` as a Hugging Face directory (config.json + model.safetensors) both engines load."""
    return save_hf_dir(cfg, ours.state_dict(), directory)


def hf_twin(cfg: ModelConfig, ours: nn.Module, device: torch.device, experts: str = "grouped_mm") -> nn.Module:
    """The transformers model of ``cfg``'s family holding exactly our weights, on ``device``, in
    train mode (exported to a temporary directory and loaded back)."""
    with tempfile.TemporaryDirectory() as tmp:
        save_twin_dir(cfg, ours, tmp)
        ref = load_hf_twin(cfg, tmp, experts)
    return ref.to(device).train()


def mla_moe_shape(cfg: ModelConfig) -> dict:
    """The fields that size an MLA + MoE (DeepSeek-V3 style) config, for a benchmark's report."""
    moe = cfg.moe
    return {"family": cfg.family, "vocab": cfg.vocab_size, "dim": cfg.dim, "layers": cfg.n_layers,
            "heads": cfg.n_heads, "q_lora_rank": cfg.q_lora_rank, "kv_lora_rank": cfg.kv_lora_rank,
            "qk_rope_head_dim": cfg.qk_rope_head_dim, "qk_nope_head_dim": cfg.qk_nope_head_dim,
            "v_head_dim": cfg.v_head_dim, "ffn": cfg.ffn_hidden_dim, "routed_experts": moe.n_routed_experts,
            "experts_per_token": moe.num_experts_per_tok, "shared_experts": moe.n_shared_experts,
            "moe_ffn": moe.moe_ffn_hidden_dim, "first_k_dense_replace": moe.first_k_dense_replace,
            "n_group": moe.n_group}
