"""Hugging Face ``config.json`` ↔ `ModelConfig` for the families `model/hf.py` converts.

Reads both spellings found in the wild: the classic hub fields (``rope_theta`` +
``rope_scaling``, ``rope_local_base_freq``, ``sliding_window_pattern``) and the newer
``rope_parameters`` / ``layer_types`` written by transformers 5. Writes the classic fields
(plus ``layer_types``), which every transformers version from 4.45 on reads the same way.
Fields a checkpoint may omit take the defaults of the matching transformers config class.

Anything this package cannot represent exactly (another ``model_type``, a RoPE type,
an activation, partial rotary, ...) raises `HFFormatError` with one line naming it.
"""
from __future__ import annotations

from typing import Any, Optional

from pydantic import ValidationError

from model.config import ModelConfig, RopeScaling
from model.hf_mamba2 import MODEL_TYPE as MAMBA2, mamba2_config_from_hf, mamba2_config_to_hf


class HFFormatError(ValueError):
    """A Hugging Face config or checkpoint that cannot be converted (one-line message)."""


# our family → (HF model_type, HF architecture class)
HF_NAMES: dict[str, tuple[str, str]] = {
    "llama": ("llama", "LlamaForCausalLM"),
    "qwen2": ("qwen2", "Qwen2ForCausalLM"),
    "qwen3": ("qwen3", "Qwen3ForCausalLM"),
    "mistral": ("mistral", "MistralForCausalLM"),
    "gemma2": ("gemma2", "Gemma2ForCausalLM"),
    "gemma3": ("gemma3_text", "Gemma3ForCausalLM"),
    "deepseek_v3": ("deepseek_v3", "DeepseekV3ForCausalLM"),
}
FAMILY_OF_MODEL_TYPE: dict[str, str] = {model_type: fam for fam, (model_type, _) in HF_NAMES.items()}

# Defaults of the transformers config classes, for fields a config.json may leave out.
_COMMON = {"num_key_value_heads": None, "head_dim": None, "initializer_range": 0.02, "rms_norm_eps": 1e-6,
           "hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": False,
           "rope_theta": 10000.0}
_GEMMA = {**_COMMON, "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256, "hidden_size": 2304,
          "intermediate_size": 9216, "num_hidden_layers": 26, "hidden_activation": "gelu_pytorch_tanh",
          "tie_word_embeddings": True, "query_pre_attn_scalar": 256, "sliding_window": 4096}
_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {**_COMMON, "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008,
              "num_hidden_layers": 32, "num_attention_heads": 32, "max_position_embeddings": 2048},
    "mistral": {**_COMMON, "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336,
                "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                "max_position_embeddings": 4096 * 32, "sliding_window": 4096},
    "qwen2": {**_COMMON, "vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 22016,
              "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
              "max_position_embeddings": 32768, "use_sliding_window": False, "sliding_window": 4096,
              "max_window_layers": 28},
    "gemma2": {**_GEMMA, "vocab_size": 256000, "max_position_embeddings": 8192,
               "final_logit_softcapping": 30.0, "attn_logit_softcapping": 50.0},
    "gemma3": {**_GEMMA, "vocab_size": 262208, "max_position_embeddings": 131072, "rope_theta": 1_000_000.0,
               "rope_local_base_freq": 10000.0, "sliding_window_pattern": 6,
               "final_logit_softcapping": None, "attn_logit_softcapping": None},
    "deepseek_v3": {**_COMMON, "vocab_size": 129280, "hidden_size": 7168, "intermediate_size": 18432,
                    "moe_intermediate_size": 2048, "num_hidden_layers": 61, "num_attention_heads": 128,
                    "n_shared_experts": 1, "n_routed_experts": 256, "routed_scaling_factor": 2.5,
                    "kv_lora_rank": 512, "q_lora_rank": 1536, "qk_rope_head_dim": 64, "v_head_dim": 128,
                    "qk_nope_head_dim": 128, "n_group": 8, "topk_group": 4, "num_experts_per_tok": 8,
                    "first_k_dense_replace": 3, "norm_topk_prob": True, "max_position_embeddings": 4096,
                    "rope_interleave": True},
}
_DEFAULTS["qwen3"] = {**_DEFAULTS["qwen2"], "head_dim": 128}

_LAYER_TYPES = {"full_attention": "full", "sliding_attention": "sliding", "attention": "full"}
_GELU_TANH = ("gelu_pytorch_tanh", "gelu_new")
_ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3")
# RopeScaling fields written to config.json per type (plus mscale_all_dim whenever it is set)
_SCALING_KEYS = {
    "linear": ("factor",),
    "dynamic": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    "yarn": ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale", "attention_factor"),
}


class _Fields:
    """Look-ups in one config.json dict with the family's defaults; a missing field is an error."""

    def __init__(self, d: dict[str, Any], family: str):
        self.d, self.defaults, self.model_type = d, _DEFAULTS[family], d.get("model_type")

    def __call__(self, key: str) -> Any:
        if key in self.d:
            return self.d[key]
        if key in self.defaults:
            return self.defaults[key]
        raise HFFormatError(f"config.json of model_type {self.model_type!r} lacks the field {key!r}")


def _unsupported(model_type: str, field: str, value: Any, allowed: str) -> HFFormatError:
    return HFFormatError(f"model_type {model_type!r}: unsupported {field}={value!r} (supported: {allowed})")


# ---------------------------------------------------------------- RoPE
def _scaling_from_hf(p: Optional[dict], max_pos: int, model_type: str) -> Optional[dict[str, Any]]:
    """One HF rope dict (classic ``rope_scaling`` or a ``rope_parameters`` entry) → the fields
    of our `RopeScaling` (validated with the rest of the ModelConfig)."""
    if not p:
        return None
    kind = p.get("rope_type", p.get("type", "default"))
    if kind not in _ROPE_TYPES:
        raise _unsupported(model_type, "rope_type", kind, ", ".join(_ROPE_TYPES))
    if p.get("partial_rotary_factor", 1.0) != 1.0:
        raise _unsupported(model_type, "partial_rotary_factor", p["partial_rotary_factor"], "1.0")
    if kind == "default":
        return None
    out: dict[str, Any] = {"type": kind}
    # the pre-training length: None stands for max_position_embeddings in both implementations
    # (transformers' dynamic scaling always uses max_position_embeddings)
    if kind in ("yarn", "llama3"):
        out["original_max_position_embeddings"] = p.get("original_max_position_embeddings")
    factor = p.get("factor")
    if factor is None and kind == "yarn":
        factor = max_pos / (out["original_max_position_embeddings"] or max_pos)
    if factor is None:
        raise HFFormatError(f"model_type {model_type!r}: rope scaling {kind!r} lacks 'factor'")
    out["factor"] = factor
    if kind == "llama3":
        out["low_freq_factor"] = p["low_freq_factor"]
        out["high_freq_factor"] = p["high_freq_factor"]
    if p.get("mscale_all_dim"):  # also scales DeepSeek's MLA softmax, whatever the rope type
        out["mscale_all_dim"] = p["mscale_all_dim"]
    if kind == "yarn":
        if p.get("truncate", True) is not True:
            raise _unsupported(model_type, "rope_scaling.truncate", p["truncate"], "true")
        for key in ("mscale", "attention_factor"):
            if p.get(key) is not None:
                out[key] = p[key]
        if p.get("mscale_all_dim") and p.get("mscale") is None:
            out["mscale"] = 0.0  # transformers: without mscale, mscale_all_dim does not enter the ratio
        for key in ("beta_fast", "beta_slow"):  # transformers reads 0 / None as the defaults 32 / 1
            if p.get(key):
                out[key] = p[key]
    return out


def _scaling_to_hf(s: Optional[RopeScaling]) -> Optional[dict]:
    if s is None:
        return None
    out: dict[str, Any] = {"rope_type": s.type}
    for key in _SCALING_KEYS[s.type]:
        value = getattr(s, key)
        if value is not None:
            out[key] = value
    if s.mscale_all_dim:
        out["mscale_all_dim"] = s.mscale_all_dim
    return out


def _rope_dicts(d: dict[str, Any]) -> tuple[Optional[dict], Optional[dict]]:
    """(global rope dict, sliding-layer rope dict or None) from either spelling of the fields.

    transformers gives the classic ``rope_scaling`` priority over ``rope_parameters``; the
    classic ``rope_theta`` only fills a missing value.
    """
    params = d.get("rope_parameters") or {}
    nested = any(k in _LAYER_TYPES for k in params)
    full = dict(params.get("full_attention") or {}) if nested else dict(params)
    sliding = dict(params.get("sliding_attention") or {}) if nested else None
    if d.get("rope_scaling"):
        full.update(d["rope_scaling"])
    return full, sliding


# ---------------------------------------------------------------- layers
def _sliding_layout(d: dict, family: str, n_layers: int, window: Optional[int],
                    model_type: str) -> tuple[Optional[int], Optional[list[str]]]:
    """(sliding_window, layer_types) in our convention: layer_types None means every layer
    slides when a window is set; a window no layer uses is dropped."""
    raw = d.get("layer_types") if family in ("qwen2", "qwen3", "gemma2", "gemma3") else None
    if raw is not None:
        bad = [t for t in raw if t not in _LAYER_TYPES]
        if bad:
            raise _unsupported(model_type, "layer_types entry", bad[0], ", ".join(_LAYER_TYPES))
        types = [_LAYER_TYPES[t] for t in raw]
    elif family == "gemma2":  # even layers slide, odd layers are global
        types = ["sliding" if (i + 1) % 2 else "full" for i in range(n_layers)]
    elif family == "gemma3":  # every `sliding_window_pattern`-th layer is global
        pattern = d.get("sliding_window_pattern", _DEFAULTS["gemma3"]["sliding_window_pattern"])
        types = ["sliding" if (i + 1) % pattern else "full" for i in range(n_layers)]
    elif family in ("qwen2", "qwen3"):  # layers from max_window_layers on slide
        first = d.get("max_window_layers", _DEFAULTS[family]["max_window_layers"])
        types = ["sliding" if i >= first else "full" for i in range(n_layers)]
    else:  # mistral: one window for every layer; llama, deepseek_v3: none
        return window, None
    if window is None or "sliding" not in types:
        return None, None
    return window, (None if all(t == "sliding" for t in types) else types)


# ---------------------------------------------------------------- HF → ours
def config_from_hf(hf: dict[str, Any], with_mtp: bool = False) -> ModelConfig:
    """A Hugging Face ``config.json`` dict → `ModelConfig` (raises `HFFormatError`).

    ``with_mtp``: keep DeepSeek-V3's ``num_nextn_predict_layers`` multi-token prediction
    modules (``mtp_depth``); set it only when the checkpoint holds their weights (transformers
    itself ignores them, and configs it writes announce them without saving any).
    """
    model_type = hf.get("model_type")
    if model_type == MAMBA2:
        return mamba2_config_from_hf(hf, HFFormatError)
    if model_type not in FAMILY_OF_MODEL_TYPE:
        supported = ", ".join(sorted([*FAMILY_OF_MODEL_TYPE, MAMBA2]))
        if model_type == "gemma3":
            raise HFFormatError("model_type 'gemma3' is the multimodal Gemma 3; only its text model "
                                "(model_type gemma3_text, Gemma3ForCausalLM) is supported")
        raise HFFormatError(f"unsupported model_type {model_type!r} (supported: {supported})")
    family = FAMILY_OF_MODEL_TYPE[model_type]
    f = _Fields(hf, family)
    gemma = family in ("gemma2", "gemma3")

    act = f("hidden_activation") if gemma else f("hidden_act")
    if gemma and act not in _GELU_TANH:
        raise _unsupported(model_type, "hidden_activation", act, ", ".join(_GELU_TANH))
    if not gemma and act != "silu":
        raise _unsupported(model_type, "hidden_act", act, "silu")
    if hf.get("quantization_config"):
        method = hf["quantization_config"].get("quant_method", "?")
        raise _unsupported(model_type, "quantization_config.quant_method", method, "none (dequantize first)")
    if hf.get("use_bidirectional_attention"):
        raise _unsupported(model_type, "use_bidirectional_attention", True, "false")

    if hf.get("partial_rotary_factor", 1.0) != 1.0:
        raise _unsupported(model_type, "partial_rotary_factor", hf["partial_rotary_factor"], "1.0")
    n_heads, dim, max_pos = f("num_attention_heads"), f("hidden_size"), f("max_position_embeddings")
    head_dim = f("head_dim") if family != "deepseek_v3" else None
    full_rope, sliding_rope = _rope_dicts(hf)
    rope_theta = full_rope.get("rope_theta") or f("rope_theta")
    rope_local_theta = None
    if family == "gemma3":
        sliding_rope = sliding_rope or {}
        if _scaling_from_hf(sliding_rope, max_pos, model_type) is not None:
            raise _unsupported(model_type, "sliding_attention rope_type", sliding_rope.get("rope_type"), "default")
        rope_local_theta = sliding_rope.get("rope_theta") or f("rope_local_base_freq")

    window = f("sliding_window") if family in ("mistral", "gemma2", "gemma3") else None
    if family in ("qwen2", "qwen3") and f("use_sliding_window"):
        window = f("sliding_window")
    n_layers = f("num_hidden_layers")
    window, layer_types = _sliding_layout(hf, family, n_layers, window, model_type)
    attention_bias = family == "qwen2" or f("attention_bias")

    args: dict[str, Any] = dict(
        family=family,
        vocab_size=f("vocab_size"),
        dim=dim,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=f("num_key_value_heads") if family != "deepseek_v3" else None,
        head_dim=None if not head_dim or (dim % n_heads == 0 and head_dim == dim // n_heads) else head_dim,
        ffn_hidden_dim=f("intermediate_size"),
        ffn_type="geglu" if gemma else "swiglu",
        max_seq_len=max_pos,
        norm_type="gemma_rmsnorm" if gemma else "rmsnorm",
        norm_eps=f("rms_norm_eps"),
        sandwich_norm=gemma,
        qkv_bias=bool(attention_bias),
        attn_out_bias=bool(attention_bias) and family != "qwen2",
        mlp_bias=bool(f("mlp_bias")) if family == "llama" else False,
        qk_norm=family in ("qwen3", "gemma3"),
        sliding_window=window,
        layer_types=layer_types,
        rope_theta=rope_theta,
        rope_local_theta=rope_local_theta,
        rope_scaling=_scaling_from_hf(full_rope, max_pos, model_type),
        tie_embeddings=bool(f("tie_word_embeddings")),
        embed_scale=gemma,
        init_std=f("initializer_range"),
    )
    if gemma:
        args.update(attn_logit_softcap=f("attn_logit_softcapping"), final_logit_softcap=f("final_logit_softcapping"),
                    query_pre_attn_scalar=f("query_pre_attn_scalar"))
    if family == "deepseek_v3":
        args.update(_deepseek_fields(hf, f, model_type))
        if with_mtp:
            args["mtp_depth"] = hf.get("num_nextn_predict_layers", 0)
    try:
        return ModelConfig(**args)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(x) for x in err["loc"])
        raise HFFormatError(f"model_type {model_type!r} maps to an invalid ModelConfig: {where} {err['msg']}") from None


def _deepseek_fields(hf: dict, f: _Fields, model_type: str) -> dict[str, Any]:
    if hf.get("scoring_func", "sigmoid") != "sigmoid":
        raise _unsupported(model_type, "scoring_func", hf["scoring_func"], "sigmoid")
    if hf.get("topk_method", "noaux_tc") != "noaux_tc":
        raise _unsupported(model_type, "topk_method", hf["topk_method"], "noaux_tc")
    if hf.get("moe_layer_freq", 1) != 1:
        raise _unsupported(model_type, "moe_layer_freq", hf["moe_layer_freq"], "1")
    moe = dict(  # validated as a MoEConfig together with the ModelConfig
        n_routed_experts=f("n_routed_experts"),
        n_shared_experts=f("n_shared_experts"),
        num_experts_per_tok=f("num_experts_per_tok"),
        moe_ffn_hidden_dim=f("moe_intermediate_size"),
        scoring_func="sigmoid",
        norm_topk_prob=bool(f("norm_topk_prob")),
        routed_scaling_factor=f("routed_scaling_factor"),
        n_group=f("n_group"),
        topk_group=f("topk_group"),
        first_k_dense_replace=f("first_k_dense_replace"),
    )
    return dict(attention_type="mla", q_lora_rank=f("q_lora_rank"), kv_lora_rank=f("kv_lora_rank"),
                qk_rope_head_dim=f("qk_rope_head_dim"), qk_nope_head_dim=f("qk_nope_head_dim"),
                v_head_dim=f("v_head_dim"), moe=moe)


# ---------------------------------------------------------------- ours → HF
def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """`ModelConfig` → a Hugging Face ``config.json`` dict that loads with ``AutoConfig``.

    Raises `HFFormatError` naming the first field the target family cannot express (checked
    by converting back and comparing every field that changes the forward pass).
    """
    if cfg.family == MAMBA2:
        return mamba2_config_to_hf(cfg, HFFormatError)
    if cfg.family not in HF_NAMES:
        raise HFFormatError(f"family {cfg.family!r} has no Hugging Face counterpart (supported: {', '.join(HF_NAMES)})")
    model_type, arch = HF_NAMES[cfg.family]
    gemma = cfg.family in ("gemma2", "gemma3")
    hf: dict[str, Any] = {
        "architectures": [arch],
        "model_type": model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.ffn_hidden_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.kv_heads if cfg.attention_type != "mla" else cfg.n_heads,
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "initializer_range": cfg.init_std,
        "tie_word_embeddings": cfg.tie_embeddings,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": _scaling_to_hf(cfg.rope_scaling),
    }
    if cfg.family != "deepseek_v3":
        hf["head_dim"] = cfg.attn_head_dim
    if gemma:
        scalar = cfg.query_pre_attn_scalar
        if scalar is not None and float(scalar).is_integer():
            scalar = int(scalar)  # transformers 5 types this field as int
        hf.update(hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=scalar,
                  attn_logit_softcapping=cfg.attn_logit_softcap, final_logit_softcapping=cfg.final_logit_softcap)
    else:
        hf["hidden_act"] = "silu"
    if cfg.family != "qwen2":
        hf["attention_bias"] = cfg.qkv_bias
    if cfg.family == "llama":
        hf["mlp_bias"] = cfg.mlp_bias
    if cfg.family == "gemma3":
        hf["rope_local_base_freq"] = cfg.rope_local_theta
    if cfg.family in ("qwen2", "qwen3"):
        hf["use_sliding_window"] = cfg.sliding_window is not None
        first_sliding = next((i for i in range(cfg.n_layers) if cfg.layer_type(i) == "sliding"), cfg.n_layers)
        hf["max_window_layers"] = first_sliding
    if cfg.family in ("mistral", "qwen2", "qwen3", "gemma2", "gemma3"):
        hf["sliding_window"] = cfg.sliding_window
    if cfg.family in ("qwen2", "qwen3", "gemma2", "gemma3"):
        hf["layer_types"] = [f"{cfg.layer_type(i)}_attention" for i in range(cfg.n_layers)]
    if cfg.family == "deepseek_v3":
        hf.update(_deepseek_to_hf(cfg))
    _check_round_trip(cfg, hf)
    return hf


def _deepseek_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    if cfg.moe is None:
        raise HFFormatError("family 'deepseek_v3' export needs moe (DeepseekV3 has MoE layers)")
    m = cfg.moe
    return {
        "q_lora_rank": cfg.q_lora_rank, "kv_lora_rank": cfg.kv_lora_rank,
        "qk_rope_head_dim": cfg.qk_rope_head_dim, "qk_nope_head_dim": cfg.qk_nope_head_dim,
        "v_head_dim": cfg.v_head_dim, "n_routed_experts": m.n_routed_experts, "n_shared_experts": m.n_shared_experts,
        "num_experts_per_tok": m.num_experts_per_tok, "moe_intermediate_size": m.moe_ffn_hidden_dim,
        "norm_topk_prob": m.norm_topk_prob, "routed_scaling_factor": m.routed_scaling_factor, "n_group": m.n_group,
        "topk_group": m.topk_group, "first_k_dense_replace": m.first_k_dense_replace, "scoring_func": "sigmoid",
        "topk_method": "noaux_tc", "rope_interleave": True, "num_nextn_predict_layers": cfg.mtp_depth,
    }


# fields that do not change the forward pass (training knobs)
_TRAINING_ONLY = {"init_std", "dropout", "mtp_loss_weight", "linear_feature_map"}
_MOE_TRAINING_ONLY = {"bias_update_speed", "seq_aux_loss_alpha"}


def _check_round_trip(cfg: ModelConfig, hf: dict[str, Any]) -> None:
    back = config_from_hf(hf, with_mtp=True)
    ours, theirs = cfg.model_dump(), back.model_dump()
    if cfg.moe is not None and back.moe is not None:
        for key in _MOE_TRAINING_ONLY:
            theirs["moe"][key] = ours["moe"][key]
    # linear scaling divides every position by `factor`: the pre-training length it records (an SFT
    # context extension fills it in) changes nothing in the forward pass, and HF has no field for it
    if ours["rope_scaling"] and ours["rope_scaling"]["type"] == "linear" and theirs["rope_scaling"]:
        ours["rope_scaling"]["original_max_position_embeddings"] = theirs["rope_scaling"]["original_max_position_embeddings"]
    # equivalent spellings: an explicit head_dim equal to dim // n_heads, a layer pattern that is the default
    for key in ("head_dim", "layer_types", "n_kv_heads"):
        if getattr(cfg, key) != getattr(back, key) and _same_derived(cfg, back, key):
            theirs[key] = ours[key]
    for key in ours:
        if key.startswith("mamba_") and not cfg.has_mamba:
            continue  # read by Mamba-2 layers only
        if key not in _TRAINING_ONLY and ours[key] != theirs[key]:
            raise HFFormatError(f"cannot export {key}={ours[key]!r} to a {hf['model_type']} checkpoint "
                                f"(it would load back as {theirs[key]!r})")


def _same_derived(a: ModelConfig, b: ModelConfig, key: str) -> bool:
    if key == "head_dim":
        return a.attn_head_dim == b.attn_head_dim
    if key == "n_kv_heads":
        return a.kv_heads == b.kv_heads or a.attention_type == "mla"
    return [a.layer_type(i) for i in range(a.n_layers)] == [b.layer_type(i) for i in range(b.n_layers)]
