"""Hugging Face ``Mamba2ForCausalLM`` (model_type ``mamba2``) ↔ our family ``mamba2``.

`model/hf_config.py` and `model/hf.py` hand mamba2 configs and state dicts to this module.
Only pure Mamba-2 stacks have a ``transformers`` counterpart: a hybrid (``layer_types`` with
attention layers) is refused on export.

Config: ``hidden_size``, ``num_hidden_layers``, ``state_size``, ``expand``, ``head_dim``,
``n_groups``, ``conv_kernel``, ``chunk_size``, ``use_bias``, ``use_conv_bias``,
``layer_norm_epsilon`` (both RMSNorms) and ``tie_word_embeddings`` map to fields of ours;
``num_heads`` must equal expand * hidden_size / head_dim. Mamba-2 has no position limit, so
``max_position_embeddings`` is ours, written on export and read back (else `DEFAULT_MAX_SEQ_LEN`).
``time_step_min/max/floor``, ``initializer_range`` and ``rescale_prenorm_residual`` only
initialise; ``residual_in_fp32`` only rounds the residual in low precision.

Weights: ``backbone.embeddings`` (or the original checkpoints' ``backbone.embedding``) ↔
``embed``, ``backbone.norm_f`` ↔ ``norm``, ``backbone.layers.{i}.*`` ↔ ``layers.{i}.*`` with
the same names inside a layer (``norm``, ``mixer.in_proj``, ``mixer.conv1d``, ``mixer.A_log``, ...).
"""
from __future__ import annotations

import math
from typing import Any

import torch
from pydantic import ValidationError

from model.config import ModelConfig

MODEL_TYPE, ARCHITECTURE = "mamba2", "Mamba2ForCausalLM"
DEFAULT_MAX_SEQ_LEN = 2048
# transformers' Mamba2Config defaults, for fields a config.json may leave out
_DEFAULTS: dict[str, Any] = {
    "num_heads": 128, "head_dim": 64, "vocab_size": 32768, "hidden_size": 4096, "state_size": 128,
    "num_hidden_layers": 64, "layer_norm_epsilon": 1e-5, "expand": 2, "conv_kernel": 4, "n_groups": 8,
    "use_bias": False, "use_conv_bias": True, "hidden_act": "silu", "initializer_range": 0.1, "chunk_size": 256,
    "tie_word_embeddings": False, "time_step_limit": (0.0, math.inf),
}
StateDict = dict[str, torch.Tensor]


def _float(v: Any) -> float:
    """A float as config.json may spell it (transformers 5 writes infinity as {"__float__": "Infinity"})."""
    return float(v["__float__"]) if isinstance(v, dict) else float(v)


def mamba2_config_from_hf(hf: dict[str, Any], error: type[ValueError]) -> ModelConfig:
    """A ``mamba2`` config.json dict → `ModelConfig` (raises ``error`` naming what it cannot express)."""
    def f(key: str) -> Any:
        return hf.get(key, _DEFAULTS[key])

    if f("hidden_act") != "silu":
        raise error(f"model_type 'mamba2': unsupported hidden_act={f('hidden_act')!r} (supported: silu)")
    low, high = (_float(v) for v in f("time_step_limit"))
    if (low, high) != (0.0, math.inf):
        raise error(f"model_type 'mamba2': unsupported time_step_limit=({low}, {high}) (supported: (0.0, inf))")
    dim, expand, head_dim = f("hidden_size"), f("expand"), f("head_dim")
    if f("num_heads") * head_dim != expand * dim:
        raise error(f"model_type 'mamba2': num_heads={f('num_heads')} x head_dim={head_dim} must equal "
                    f"expand={expand} x hidden_size={dim}")
    try:
        return ModelConfig(
            family="mamba2", vocab_size=f("vocab_size"), dim=dim, n_layers=f("num_hidden_layers"), n_heads=1,
            max_seq_len=hf.get("max_position_embeddings", DEFAULT_MAX_SEQ_LEN), norm_eps=f("layer_norm_epsilon"),
            position_type="none", tie_embeddings=bool(f("tie_word_embeddings")), init_std=f("initializer_range"),
            mamba_state_size=f("state_size"), mamba_head_dim=head_dim, mamba_expand=expand,
            mamba_n_groups=f("n_groups"), mamba_conv_kernel=f("conv_kernel"), mamba_chunk_size=f("chunk_size"),
            mamba_conv_bias=bool(f("use_conv_bias")), mamba_proj_bias=bool(f("use_bias")),
        )
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(x) for x in err["loc"])
        raise error(f"model_type 'mamba2' maps to an invalid ModelConfig: {where} {err['msg']}") from None


def mamba2_config_to_hf(cfg: ModelConfig, error: type[ValueError]) -> dict[str, Any]:
    """Our mamba2 `ModelConfig` → a config.json dict for ``Mamba2ForCausalLM`` (``error`` if it has none)."""
    if not all(cfg.layer_type(i) == "mamba" for i in range(cfg.n_layers)):
        raise error("a hybrid Mamba-2 / attention stack has no Hugging Face counterpart (Mamba2ForCausalLM "
                    "has Mamba-2 layers only)")
    for key, plain in (("norm_type", "rmsnorm"), ("embed_scale", False), ("final_logit_softcap", None),
                       ("mtp_depth", 0)):
        if getattr(cfg, key) != plain:
            raise error(f"cannot export {key}={getattr(cfg, key)!r} to a mamba2 checkpoint (it needs {plain!r})")
    return {
        "architectures": [ARCHITECTURE], "model_type": MODEL_TYPE, "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim, "num_hidden_layers": cfg.n_layers, "state_size": cfg.mamba_state_size,
        "expand": cfg.mamba_expand, "head_dim": cfg.mamba_head_dim, "num_heads": cfg.mamba_heads,
        "n_groups": cfg.mamba_n_groups, "conv_kernel": cfg.mamba_conv_kernel, "chunk_size": cfg.mamba_chunk_size,
        "use_bias": cfg.mamba_proj_bias, "use_conv_bias": cfg.mamba_conv_bias, "hidden_act": "silu",
        "layer_norm_epsilon": cfg.norm_eps, "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_std, "residual_in_fp32": True, "max_position_embeddings": cfg.max_seq_len,
    }


_FROM_HF = {"backbone.embeddings.weight": "embed.weight", "backbone.embedding.weight": "embed.weight",
            "backbone.norm_f.weight": "norm.weight", "lm_head.weight": "lm_head.weight"}
_TO_HF = {"embed.weight": "backbone.embeddings.weight", "norm.weight": "backbone.norm_f.weight",
          "lm_head.weight": "lm_head.weight"}


def mamba2_state_dict_from_hf(sd: StateDict, cfg: ModelConfig, error: type[ValueError]) -> StateDict:
    """Hugging Face Mamba-2 names → ours (shapes are checked by the caller)."""
    out: StateDict = {}
    for name, t in sd.items():
        if name == "lm_head.weight" and cfg.tie_embeddings:
            continue  # a tied checkpoint may still carry the (identical) head
        if name in _FROM_HF:
            out[_FROM_HF[name]] = t
        elif name.startswith("backbone.layers."):
            out[name.removeprefix("backbone.")] = t
        else:
            raise error(f"checkpoint tensor {name!r} has no place in a mamba2 model")
    return out


def mamba2_state_dict_to_hf(sd: StateDict) -> StateDict:
    """Our mamba2 names → Hugging Face ones."""
    return {(_TO_HF[name] if name in _TO_HF else f"backbone.{name}"): t for name, t in sd.items()}
