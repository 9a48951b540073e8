"""Export to GGUF, the single-file model format of llama.cpp and Ollama.

A GGUF file is key/value metadata (architecture hyper-parameters, the tokenizer) followed by
named tensors, written here with ``gguf``, the format's own Python package (imported only when
an export runs). Families: Llama 2/3 and Mistral (llama.cpp architecture ``llama``), Qwen2
(``qwen2``) and Qwen3 (``qwen3``).

Tensor names follow llama.cpp (``layers.3.attn.q_proj.weight`` → ``blk.3.attn_q.weight``), with
one reshape: llama.cpp's ``llama`` architecture rotates interleaved pairs (x0, x1), (x2, x3), ...
(GGML's "normal" RoPE) while our RoPE rotates halves (x_i, x_{i+d/2}), so the rows of every
head of ``q_proj`` / ``k_proj`` are permuted from (first half, second half) to interleaved, as
llama.cpp's own ``convert_hf_to_gguf.py`` does. Qwen2/3 use the rotate-half ("neox") RoPE and
keep their rows. Llama 3's frequency scaling becomes llama.cpp's ``rope_freqs`` tensor (one
divisor per frequency); linear scaling the ``rope.scaling`` keys.

The tokenizer is a byte-level BPE ``tokenizer.json`` (the ones trained here, Llama 3's, Qwen's):
it maps onto GGUF's ``gpt2`` tokenizer model (tokens in id order, merges, token types, the
pre-tokenizer regex named by llama.cpp's ``tokenizer.ggml.pre``). The vocabulary is padded with
unused tokens up to the model's ``vocab_size``.

Weights go out as f32, f16 or q8_0 (blocks of 32 int8 with one f16 scale; a matrix whose rows do
not split into blocks of 32 stays f16, as llama.cpp's converter does); norm weights, biases and
``rope_freqs`` always stay f32. Anything the file cannot represent exactly raises
`GGUFExportError` with one line.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from model.config import ModelConfig

# our family → llama.cpp architecture
GGUF_ARCH: dict[str, str] = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
OUTTYPES = ("f32", "f16", "q8_0")
Q8_BLOCK = 32  # values per q8_0 block

# our per-layer module names → llama.cpp's
_LAYER_NAMES = {
    "attn_norm": "attn_norm", "ffn_norm": "ffn_norm",
    "attn.q_proj": "attn_q", "attn.k_proj": "attn_k", "attn.v_proj": "attn_v", "attn.o_proj": "attn_output",
    "attn.q_norm": "attn_q_norm", "attn.k_norm": "attn_k_norm",
    "ffn.gate_proj": "ffn_gate", "ffn.up_proj": "ffn_up", "ffn.down_proj": "ffn_down",
}
_TOP_NAMES = {"embed.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
              "lm_head.weight": "output.weight"}

# pre-tokenizer regexes of byte-level BPE tokenizers → llama.cpp's name for them
GPT2_REGEX = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
_PRE_TOKENIZERS = {
    GPT2_REGEX: "gpt-2",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        "llama-bpe",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        "qwen2",
}
TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED = 1, 3, 4, 5  # gguf.TokenType values


class GGUFExportError(ValueError):
    """A model or tokenizer that GGUF (as llama.cpp reads it) cannot represent exactly (one line)."""


# ---------------------------------------------------------------- what can be exported
def check_exportable(cfg: ModelConfig) -> None:
    """Raise `GGUFExportError` for a config llama.cpp's architecture would not compute the same way."""
    if cfg.family not in GGUF_ARCH:
        raise GGUFExportError(f"family {cfg.family!r} has no GGUF export (supported: {', '.join(GGUF_ARCH)})")
    unsupported = {
        "attention_type": cfg.attention_type != "mha", "position_type": cfg.position_type != "rope",
        "ffn_type": cfg.ffn_type != "swiglu", "norm_type": cfg.norm_type != "rmsnorm", "moe": cfg.moe is not None,
        "sandwich_norm": cfg.sandwich_norm, "embed_scale": cfg.embed_scale, "mtp_depth": cfg.mtp_depth > 0,
        "attn_logit_softcap": cfg.attn_logit_softcap is not None,
        "final_logit_softcap": cfg.final_logit_softcap is not None,
        "query_pre_attn_scalar": cfg.query_pre_attn_scalar is not None,
        "layer_types": cfg.layer_types is not None and len(set(cfg.layer_types)) > 1,
        "qk_norm": cfg.qk_norm and cfg.family != "qwen3",
        # llama.cpp's llama architecture reads every bias, qwen2 those of q/k/v, qwen3 none
        "qkv_bias": cfg.qkv_bias and cfg.family == "qwen3",
        "attn_out_bias": cfg.attn_out_bias and cfg.family in ("qwen2", "qwen3"),
        "mlp_bias": cfg.mlp_bias and cfg.family in ("qwen2", "qwen3"),
        "rope_scaling": cfg.rope_scaling is not None and cfg.rope_scaling.type not in ("linear", "llama3"),
    }
    bad = [field for field, is_bad in unsupported.items() if is_bad]
    if bad:
        value = getattr(cfg, bad[0])
        value = value.type if bad[0] == "rope_scaling" else value
        raise GGUFExportError(f"{cfg.family} with {bad[0]}={value!r} has no exact GGUF counterpart")


def _interleave_rope_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of each head from rotate-half order (x_0..x_{d/2-1}, x_{d/2}..) to interleaved pairs
    (x_0, x_{d/2}, x_1, x_{d/2+1}, ...): our q/k projection → llama.cpp's "normal" RoPE layout."""
    rows = w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:])  # (H, 2, d/2, ...)
    return rows.transpose(1, 2).reshape(w.shape)


def llama3_rope_factors(cfg: ModelConfig) -> torch.Tensor:
    """(head_dim / 2,) divisors of the RoPE frequencies that Llama 3 scaling applies (llama.cpp's
    ``rope_freqs``): 1 for short wavelengths, ``factor`` for long ones, smoothed between."""
    s = cfg.rope_scaling
    old_len = s.original_max_position_embeddings or cfg.max_seq_len
    d = cfg.attn_head_dim
    low_wavelen, high_wavelen = old_len / s.low_freq_factor, old_len / s.high_freq_factor
    factors = []
    for i in range(0, d, 2):
        wavelen = 2 * math.pi * cfg.rope_theta ** (i / d)
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(s.factor)
        else:
            smooth = (old_len / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
            factors.append(1 / ((1 - smooth) / s.factor + smooth))
    return torch.tensor(factors, dtype=torch.float32)


def gguf_tensors(cfg: ModelConfig, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict → llama.cpp tensor names and layouts (float32, CPU)."""
    check_exportable(cfg)
    permute = GGUF_ARCH[cfg.family] == "llama"
    out: dict[str, torch.Tensor] = {}
    for name, t in sd.items():
        t = t.detach().to("cpu", torch.float32)
        if name in _TOP_NAMES:
            out[_TOP_NAMES[name]] = t
            continue
        parts = name.split(".")  # layers.{i}.{module...}.{weight|bias}
        module = ".".join(parts[2:-1])
        if parts[0] != "layers" or module not in _LAYER_NAMES:
            raise GGUFExportError(f"tensor {name!r} has no GGUF counterpart")
        if permute and module in ("attn.q_proj", "attn.k_proj"):
            t = _interleave_rope_rows(t, cfg.n_heads if module == "attn.q_proj" else cfg.kv_heads)
        out[f"blk.{parts[1]}.{_LAYER_NAMES[module]}.{parts[-1]}"] = t
    if cfg.rope_scaling is not None and cfg.rope_scaling.type == "llama3":
        out["rope_freqs.weight"] = llama3_rope_factors(cfg)
    return out


# ---------------------------------------------------------------- tokenizer
def _pre_tokenizer_name(tok: dict) -> str:
    """llama.cpp's name of a byte-level tokenizer.json's pre-tokenizer (GGUFExportError otherwise)."""
    pre = tok.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    regex = None
    for step in steps:
        if step.get("type") == "ByteLevel":
            if step.get("add_prefix_space"):
                raise GGUFExportError("tokenizer.json: ByteLevel(add_prefix_space=true) has no GGUF counterpart")
            if step.get("use_regex", True):
                regex = GPT2_REGEX
        elif step.get("type") == "Split" and regex is None:
            regex = (step.get("pattern") or {}).get("Regex")
        else:
            raise GGUFExportError(f"tokenizer.json: pre-tokenizer {step.get('type')!r} is not supported "
                                  "(supported: byte-level BPE with the GPT-2, Llama 3 or Qwen2 regex)")
    if regex not in _PRE_TOKENIZERS:
        raise GGUFExportError("tokenizer.json: its pre-tokenizer regex is none of GPT-2's, Llama 3's or Qwen2's "
                              "(the ones llama.cpp names)")
    return _PRE_TOKENIZERS[regex]


def tokenizer_fields(tok: dict, vocab_size: int) -> dict:
    """The ``gpt2`` tokenizer of GGUF from a tokenizer.json dict: tokens (id order, padded to
    ``vocab_size`` with unused ``[PAD{i}]``), token types, merges and the pre-tokenizer name."""
    model = tok.get("model") or {}
    if model.get("type") != "BPE" or (tok.get("decoder") or {}).get("type") != "ByteLevel":
        raise GGUFExportError("tokenizer.json is not a byte-level BPE (GGUF export supports the gpt2 tokenizer only)")
    pre = _pre_tokenizer_name(tok)
    tokens: dict[int, tuple[str, int]] = {i: (text, TOKEN_NORMAL) for text, i in model["vocab"].items()}
    for added in tok.get("added_tokens", []):
        tokens[added["id"]] = (added["content"], TOKEN_CONTROL if added.get("special") else TOKEN_USER_DEFINED)
    if max(tokens) >= vocab_size:
        raise GGUFExportError(f"tokenizer.json has token id {max(tokens)} but the model's vocab_size is {vocab_size}")
    filled = [tokens.get(i, (f"[PAD{i}]", TOKEN_UNUSED)) for i in range(vocab_size)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return {"pre": pre, "tokens": [t for t, _ in filled], "types": [k for _, k in filled], "merges": merges}


# ---------------------------------------------------------------- writing
def _encode(t: torch.Tensor, outtype: str) -> tuple[np.ndarray, Optional[object]]:
    """(array, raw dtype for `GGUFWriter.add_tensor`) of one tensor in ``outtype``."""
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    a = t.numpy()
    if a.ndim < 2 or outtype == "f32":  # norms, biases, rope_freqs: always f32
        return a.astype(np.float32), None
    if outtype == "q8_0" and a.shape[-1] % Q8_BLOCK == 0:
        return quantize(a.astype(np.float32), GGMLQuantizationType.Q8_0), GGMLQuantizationType.Q8_0
    return a.astype(np.float16), None


def write_gguf(
    cfg: ModelConfig, sd: dict[str, torch.Tensor], path: os.PathLike, outtype: str = "f32",
    tokenizer: Optional[dict] = None, special_ids: Optional[dict[str, int]] = None,
    add_bos: bool = False, chat_template: Optional[str] = None, name: str = "model",
) -> Path:
    """Write ``cfg`` + ``sd`` (our names) as a GGUF file at ``path`` (atomically: temp file + rename).

    ``tokenizer``: the tokenizer.json dict; ``special_ids``: ``bos`` / ``eos`` / ``pad`` token ids;
    ``add_bos``: whether encoding text starts with the bos token (Llama 3 does, ours does not).
    """
    import gguf

    if outtype not in OUTTYPES:
        raise GGUFExportError(f"outtype {outtype!r} is not one of {', '.join(OUTTYPES)}")
    tensors = gguf_tensors(cfg, sd)
    tok = tokenizer_fields(tokenizer, cfg.vocab_size) if tokenizer is not None else None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    w = gguf.GGUFWriter(str(tmp), GGUF_ARCH[cfg.family])
    w.add_name(name)
    w.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                     "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[outtype])
    w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(cfg.dim)
    w.add_block_count(cfg.n_layers)
    w.add_feed_forward_length(cfg.ffn_hidden_dim)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(cfg.kv_heads)
    w.add_key_length(cfg.attn_head_dim)
    w.add_value_length(cfg.attn_head_dim)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_rope_dimension_count(cfg.attn_head_dim)
    w.add_vocab_size(cfg.vocab_size)
    if cfg.rope_scaling is not None and cfg.rope_scaling.type == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(cfg.rope_scaling.factor)
    if tok is not None:
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(tok["pre"])
        w.add_token_list(tok["tokens"])
        w.add_token_types(tok["types"])
        w.add_token_merges(tok["merges"])
        w.add_add_bos_token(add_bos)
        for key, token_id in (special_ids or {}).items():
            getattr(w, f"add_{key}_token_id")(token_id)
        if chat_template:
            w.add_chat_template(chat_template)
    for tensor_name, t in tensors.items():
        array, raw_dtype = _encode(t, outtype)
        w.add_tensor(tensor_name, array, raw_dtype=raw_dtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.replace(tmp, path)
    return path
