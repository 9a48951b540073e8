"""One typed configuration for every model the package builds.

Sizes are data, not classes (as in torchtitan's model args): a Llama, a Gemma 2 or a
DeepSeek-V3 is the same `Transformer` built from a different `ModelConfig`.

The config is a pydantic model with ``extra="forbid"`` so that a YAML ``model:`` section
is validated field by field (unknown key, wrong type, out of range) and impossible
combinations are rejected here, once, with a message naming the field.
"""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt, field_validator, model_validator

Family = Literal["llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3", "deepseek_v3", "mamba2", "custom"]
LayerType = Literal["full", "sliding", "mamba"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RopeScaling(_Strict):
    """RoPE frequency scaling for context extension.

    - ``linear``: positions divided by ``factor`` (Chen et al. 2023, position interpolation).
    - ``dynamic``: NTK-aware base rescaled when the sequence exceeds the original length.
    - ``yarn``: NTK-by-parts interpolation + attention temperature (Peng et al. 2023).
    - ``llama3``: Llama 3.1 wavelength-banded scaling.
    """

    type: Literal["linear", "dynamic", "yarn", "llama3"]
    factor: PositiveFloat = 1.0
    original_max_position_embeddings: Optional[PositiveInt] = None
    # llama3
    low_freq_factor: PositiveFloat = 1.0
    high_freq_factor: PositiveFloat = 4.0
    # yarn
    beta_fast: PositiveFloat = 32.0
    beta_slow: PositiveFloat = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0
    attention_factor: Optional[float] = None


class MoEConfig(_Strict):
    """DeepSeekMoE (Dai et al. 2024) as used in DeepSeek-V3 (Liu et al. 2024)."""

    n_routed_experts: PositiveInt = 8
    n_shared_experts: int = Field(1, ge=0)
    num_experts_per_tok: PositiveInt = 2  # top-k
    moe_ffn_hidden_dim: PositiveInt = 128  # hidden size of one (fine-grained) expert
    scoring_func: Literal["softmax", "sigmoid"] = "softmax"
    norm_topk_prob: bool = True
    routed_scaling_factor: PositiveFloat = 1.0
    n_group: PositiveInt = 1  # group-limited routing: experts split into n_group groups
    topk_group: PositiveInt = 1  # ... of which the best topk_group are eligible
    first_k_dense_replace: int = Field(0, ge=0)  # the first k layers keep a dense FFN
    # auxiliary-loss-free balancing (DeepSeek-V3 §2.1.2): bias += speed * sign(mean_load - load)
    bias_update_speed: float = Field(1e-3, ge=0.0)
    # optional sequence-wise auxiliary balance loss weight (0 disables it)
    seq_aux_loss_alpha: float = Field(0.0, ge=0.0)

    @model_validator(mode="after")
    def _check(self) -> "MoEConfig":
        if self.num_experts_per_tok > self.n_routed_experts:
            raise ValueError(
                f"num_experts_per_tok={self.num_experts_per_tok} exceeds n_routed_experts={self.n_routed_experts}"
            )
        if self.n_routed_experts % self.n_group != 0:
            raise ValueError(f"n_routed_experts={self.n_routed_experts} must be divisible by n_group={self.n_group}")
        if self.topk_group > self.n_group:
            raise ValueError(f"topk_group={self.topk_group} exceeds n_group={self.n_group}")
        return self


class ModelConfig(_Strict):
    """Everything needed to build one decoder-only transformer."""

    family: Family = "llama"
    vocab_size: PositiveInt = 4096
    dim: PositiveInt = 256
    n_layers: PositiveInt = 4
    n_heads: PositiveInt = 8
    n_kv_heads: Optional[PositiveInt] = None  # None → n_heads (MHA); 1 → MQA; else GQA
    head_dim: Optional[PositiveInt] = None  # None → dim // n_heads (Gemma sets it explicitly)
    ffn_hidden_dim: PositiveInt = 688
    ffn_type: Literal["swiglu", "geglu", "gelu"] = "swiglu"
    max_seq_len: PositiveInt = 256

    # normalisation
    norm_type: Literal["rmsnorm", "gemma_rmsnorm", "layernorm"] = "rmsnorm"
    norm_eps: PositiveFloat = 1e-5
    sandwich_norm: bool = False  # Gemma 2/3: extra norms after attention and after the FFN

    # attention
    attention_type: Literal["mha", "mla", "linear"] = "mha"
    qkv_bias: bool = False  # Qwen2
    attn_out_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3 / Gemma 3: RMSNorm over head_dim of q and k
    attn_logit_softcap: Optional[PositiveFloat] = None  # Gemma 2
    final_logit_softcap: Optional[PositiveFloat] = None  # Gemma 2
    query_pre_attn_scalar: Optional[PositiveFloat] = None  # Gemma 2/3: scale = scalar ** -0.5
    sliding_window: Optional[PositiveInt] = None
    # per-layer pattern; None → every layer "mamba" for family mamba2, else "sliding" if sliding_window
    # is set, else "full". "attention" is read as "full": hybrids such as [mamba, mamba, attention, ...]
    layer_types: Optional[list[LayerType]] = None
    linear_feature_map: Literal["elu", "relu"] = "elu"  # linear attention: phi(x) = elu(x) + 1

    # positions
    position_type: Literal["rope", "alibi", "none"] = "rope"
    rope_theta: PositiveFloat = 10000.0
    rope_local_theta: Optional[PositiveFloat] = None  # Gemma 3: RoPE base of sliding layers
    rope_scaling: Optional[RopeScaling] = None

    # MLA (DeepSeek-V2/V3)
    q_lora_rank: Optional[PositiveInt] = None  # None → plain q projection
    kv_lora_rank: PositiveInt = 64
    qk_rope_head_dim: PositiveInt = 16
    qk_nope_head_dim: PositiveInt = 32
    v_head_dim: PositiveInt = 32

    # Mamba-2 (SSD) layers (Dao & Gu 2024), the "mamba" entries of layer_types: d_inner = expand * dim
    # channels in mamba_heads = d_inner / mamba_head_dim heads, a (head_dim, state_size) state per head,
    # B and C shared by the heads of each of mamba_n_groups groups
    mamba_state_size: PositiveInt = 64
    mamba_head_dim: PositiveInt = 64
    mamba_expand: PositiveInt = 2
    mamba_n_groups: PositiveInt = 1
    mamba_conv_kernel: int = Field(4, ge=2)
    mamba_chunk_size: PositiveInt = 256  # SSD chunk length (training / prefill); does not change the outputs
    mamba_conv_bias: bool = True
    mamba_proj_bias: bool = False  # biases of in_proj and out_proj

    # mixture of experts (None → dense FFN everywhere)
    moe: Optional[MoEConfig] = None

    # multi-token prediction (DeepSeek-V3): number of extra sequential prediction depths
    mtp_depth: int = Field(0, ge=0)
    mtp_loss_weight: float = Field(0.3, ge=0.0)

    # embeddings / head / init
    tie_embeddings: bool = False
    embed_scale: bool = False  # Gemma: embeddings multiplied by sqrt(dim)
    init_std: PositiveFloat = 0.02
    dropout: float = Field(0.0, ge=0.0, lt=1.0)

    # ---------------------------------------------------------------- derived values
    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def attn_head_dim(self) -> int:
        return self.head_dim or self.dim // self.n_heads

    @property
    def mamba_inner(self) -> int:  # d_inner, the channels of a Mamba-2 mixer
        return self.mamba_expand * self.dim

    @property
    def mamba_heads(self) -> int:
        return self.mamba_inner // self.mamba_head_dim

    @property
    def has_mamba(self) -> bool:
        return any(self.layer_type(i) == "mamba" for i in range(self.n_layers))

    def layer_type(self, layer_idx: int) -> LayerType:
        if self.layer_types is not None:
            return self.layer_types[layer_idx]
        if self.family == "mamba2":
            return "mamba"
        return "sliding" if self.sliding_window is not None else "full"

    def is_moe_layer(self, layer_idx: int) -> bool:
        return self.moe is not None and layer_idx >= self.moe.first_k_dense_replace

    # ---------------------------------------------------------------- validation
    @field_validator("layer_types", mode="before")
    @classmethod
    def _attention_is_full(cls, v: object) -> object:
        return [("full" if t == "attention" else t) for t in v] if isinstance(v, list) else v

    @model_validator(mode="after")
    def _check_combinations(self) -> "ModelConfig":
        if self.n_heads % self.kv_heads != 0:
            raise ValueError(f"n_heads={self.n_heads} must be divisible by n_kv_heads={self.kv_heads}")
        if self.head_dim is None and self.dim % self.n_heads != 0:
            raise ValueError(f"dim={self.dim} must be divisible by n_heads={self.n_heads} (or set head_dim)")
        if self.position_type == "rope" and self.attention_type != "mla" and self.attn_head_dim % 2 != 0:
            raise ValueError(f"RoPE needs an even head_dim, got {self.attn_head_dim}")
        if self.attention_type == "mla":
            if self.position_type != "rope":
                raise ValueError(f"attention_type=mla needs position_type=rope (decoupled RoPE), got {self.position_type}")
            if self.qk_rope_head_dim % 2 != 0:
                raise ValueError(f"qk_rope_head_dim={self.qk_rope_head_dim} must be even")
            if self.sliding_window is not None:
                raise ValueError("attention_type=mla does not support sliding_window")
        if self.attention_type == "linear":
            if self.position_type == "alibi":
                raise ValueError("attention_type=linear does not support position_type=alibi")
            if self.sliding_window is not None or self.attn_logit_softcap is not None:
                raise ValueError("attention_type=linear supports neither sliding_window nor attn_logit_softcap")
        if self.layer_types is not None:
            if len(self.layer_types) != self.n_layers:
                raise ValueError(f"layer_types has {len(self.layer_types)} entries, n_layers={self.n_layers}")
            if "sliding" in self.layer_types and self.sliding_window is None:
                raise ValueError("layer_types contains 'sliding' but sliding_window is not set")
        if self.has_mamba:
            self._check_mamba()
        if self.moe is not None and self.mlp_bias:
            raise ValueError("mlp_bias is not supported with moe (routed experts have no biases)")
        if self.moe is not None and self.moe.first_k_dense_replace > self.n_layers:
            raise ValueError(
                f"moe.first_k_dense_replace={self.moe.first_k_dense_replace} exceeds n_layers={self.n_layers}"
            )
        return self

    def _check_mamba(self) -> None:
        if self.position_type == "alibi":
            raise ValueError("Mamba-2 layers (family mamba2 / layer_types 'mamba') do not support position_type=alibi")
        if self.sliding_window is not None:
            raise ValueError("Mamba-2 layers (family mamba2 / layer_types 'mamba') do not support sliding_window")
        if self.mamba_inner % self.mamba_head_dim != 0:
            raise ValueError(f"mamba_expand * dim = {self.mamba_inner} must be divisible by "
                             f"mamba_head_dim={self.mamba_head_dim}")
        if self.mamba_heads % self.mamba_n_groups != 0:
            raise ValueError(f"the {self.mamba_heads} Mamba-2 heads must be divisible by "
                             f"mamba_n_groups={self.mamba_n_groups}")
