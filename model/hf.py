"""Import / export of Hugging Face ``transformers`` checkpoint directories.

A Hugging Face directory is ``config.json`` + ``*.safetensors`` (one file, or shards listed in
``model.safetensors.index.json``). Families: Llama 2/3, Qwen2, Qwen3, Mistral, Gemma 2,
Gemma 3 (text), DeepSeek-V3 and Mamba-2 (`model/hf_mamba2.py`); `model/hf_config.py` converts
the configs, this module the weights and the files. Files are read with ``safetensors`` only (never pickle) and this
module works on dicts and tensors: it does not import ``transformers``.

Weight names map one to one (``model.layers.3.self_attn.q_proj.weight`` ↔
``layers.3.attn.q_proj.weight``), with three reshapes:

- MoE experts: Hugging Face stores one ``mlp.experts.{j}.{gate,up,down}_proj.weight`` per
  expert (transformers 5 fuses them in memory as ``gate_up_proj``; both are read); ours are
  stacked 3-D parameters.
- DeepSeek-V3 RoPE: the released weights rotate interleaved pairs (x0, x1), (x2, x3), ...
  (``rope_interleave``); our RoPE rotates halves (x_i, x_{i+d/2}). Permuting the rope rows of
  ``q_b_proj`` / ``q_proj`` and ``kv_a_proj_with_mqa`` to (even rows, odd rows) makes the two
  identical, so import permutes and export inverts it.
- DeepSeek-V3 multi-token prediction: layer ``num_hidden_layers + k`` of the checkpoint
  (``enorm``, ``hnorm``, ``eh_proj``, ``shared_head.norm`` and a full block) ↔ ``mtp.{k}``;
  its copies of the embedding and head are dropped on import and written back on export.

Reward models (`model.reward.RewardModel`) go out as ``<Family>ForSequenceClassification`` with
one label: the same backbone names under ``model.``, no ``lm_head``, plus ``score.weight``, and a
``pad_token_id`` in config.json (transformers reads the reward at the last token that is not
padding). `load_hf_reward_dir` / `save_hf_reward_dir` convert them; `load_hf_dir` refuses them,
and `load_hf_reward_dir` refuses a causal LM, so neither kind passes as the other.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional, Union

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from model.config import ModelConfig
from model.hf_config import HF_NAMES, HFFormatError, config_from_hf, config_to_hf
from model.hf_mamba2 import mamba2_state_dict_from_hf, mamba2_state_dict_to_hf
from model.reward import RewardModel, reward_backbone_config
from model.transformer import Transformer

__all__ = [
    "HFFormatError", "config_from_hf", "config_to_hf", "state_dict_from_hf", "state_dict_to_hf",
    "load_hf_dir", "save_hf_dir", "is_reward_config", "load_hf_reward_dir", "save_hf_reward_dir", "reward_architecture",
]

StateDict = dict[str, torch.Tensor]
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)  # stale RoPE buffers saved by old transformers versions
_EXPERT_PROJS = ("gate_proj", "up_proj", "down_proj")
_MTP_PARTS = {"enorm": "enorm", "hnorm": "hnorm", "eh_proj": "proj", "shared_head.norm": "norm"}
_MTP_SHARED = ("embed_tokens", "shared_head.head")  # copies of the main embedding / head
SEQ_CLS = "ForSequenceClassification"  # the suffix of transformers' reward-model architectures
SCORE = "score.weight"  # the reward head, (1, dim), the same name in both


def _module_renames(cfg: ModelConfig) -> dict[str, str]:
    """HF module name → ours, for the names inside one decoder layer."""
    names = {"self_attn": "attn", "mlp": "ffn", "input_layernorm": "attn_norm", "q_a_layernorm": "q_a_norm",
             "kv_a_proj_with_mqa": "kv_a_proj", "kv_a_layernorm": "kv_a_norm"}
    if cfg.sandwich_norm:  # Gemma: post_attention_layernorm is the sandwich norm, not the FFN's
        names.update(post_attention_layernorm="post_attn_norm", pre_feedforward_layernorm="ffn_norm",
                     post_feedforward_layernorm="post_ffn_norm")
    else:
        names["post_attention_layernorm"] = "ffn_norm"
    return names


def _rename(path: str, names: dict[str, str]) -> str:
    return ".".join(names.get(part, part) for part in path.split("."))


def _expected_shapes(cfg: ModelConfig, reward: bool = False) -> dict[str, torch.Size]:
    """Name → shape of every tensor in our state dict (a `RewardModel`'s when ``reward``), from a
    model built on the meta device."""
    with torch.device("meta"):
        model = RewardModel(cfg) if reward else Transformer(cfg)
    return {name: t.shape for name, t in model.state_dict().items()}


# ---------------------------------------------------------------- DeepSeek interleaved RoPE rows
def _rope_row_order(rope_dim: int, inverse: bool) -> torch.Tensor:
    """Interleaved → rotate-half row order (even rows, then odd rows), or its inverse."""
    order = torch.cat([torch.arange(0, rope_dim, 2), torch.arange(1, rope_dim, 2)])
    return torch.argsort(order) if inverse else order


def _permute_rope_rows(t: torch.Tensor, n_groups: int, lead: int, rope_dim: int, inverse: bool) -> torch.Tensor:
    """Permute the last ``rope_dim`` of every ``lead + rope_dim`` rows of ``t`` (out, ...)."""
    rows = t.reshape(n_groups, lead + rope_dim, *t.shape[1:])
    order = _rope_row_order(rope_dim, inverse)
    rope = rows[:, lead:][:, order]
    return torch.cat([rows[:, :lead], rope], dim=1).reshape(t.shape)


def _convert_mla_rope(sd: StateDict, cfg: ModelConfig, inverse: bool) -> None:
    """In place on our names: q rows (per head: nope then rope) and kv_a_proj rows (latent then rope)."""
    q_groups, q_lead = cfg.n_heads, cfg.qk_nope_head_dim
    for name in list(sd):
        if ".attn." not in name:
            continue
        module = name.split(".")[-2]  # layers.0.attn.q_b_proj.weight -> q_b_proj
        if module in ("q_proj", "q_b_proj"):
            sd[name] = _permute_rope_rows(sd[name], q_groups, q_lead, cfg.qk_rope_head_dim, inverse)
        elif module == "kv_a_proj":
            sd[name] = _permute_rope_rows(sd[name], 1, cfg.kv_lora_rank, cfg.qk_rope_head_dim, inverse)


# ---------------------------------------------------------------- HF → ours
def state_dict_from_hf(sd: StateDict, cfg: ModelConfig, rope_interleave: bool = True,
                       reward: bool = False) -> StateDict:
    """Hugging Face tensor names/layouts → ours for ``cfg`` (checked against the model's shapes).

    ``rope_interleave`` is the checkpoint's DeepSeek-V3 ``rope_interleave`` flag (True, the
    default of transformers and of the released weights); other families ignore it.
    ``reward``: ``sd`` is a ``*ForSequenceClassification`` (backbone + ``score.weight``), checked
    against a `RewardModel` instead.
    """
    if cfg.family == "mamba2":
        out = mamba2_state_dict_from_hf(sd, cfg, HFFormatError)
        _check_against_model(out, cfg, reward)
        return out
    names = _module_renames(cfg)
    out: StateDict = {}
    experts: dict[str, dict[int, torch.Tensor]] = {}  # our stacked name → expert index → matrix
    for hf_name, t in sd.items():
        if hf_name.endswith(_IGNORED_SUFFIXES):
            continue
        name = hf_name[len("model."):] if hf_name.startswith("model.") else hf_name
        if name == "embed_tokens.weight":
            out["embed.weight"] = t
        elif name == "lm_head.weight":
            if not cfg.tie_embeddings:  # a tied checkpoint may still carry the (identical) head
                out[name] = t
        elif name.startswith("layers."):
            _, idx, rest = name.split(".", 2)
            ours = _layer_name(int(idx), rest, cfg, names)
            if ours is None:
                continue
            parts = ours.split(".")
            if ".ffn.experts." in ours and parts[-1] == "weight" and parts[-3].isdigit():
                stacked = ".".join(parts[:-3] + [parts[-2]])  # layers.i.ffn.experts.{j}.up_proj.weight
                experts.setdefault(stacked, {})[int(parts[-3])] = t
            elif ours.endswith(".ffn.experts.gate_up_proj"):  # transformers 5 fused layout (E, 2H, D)
                gate, up = t.chunk(2, dim=1)
                out[ours.replace("gate_up_proj", "gate_proj")] = gate
                out[ours.replace("gate_up_proj", "up_proj")] = up
            elif ".shared_experts." in ours and t.numel() == 0 and cfg.moe and cfg.moe.n_shared_experts == 0:
                continue  # transformers builds an empty shared expert when there is none
            else:
                out[ours] = t
        else:
            out[name] = t
    for stacked, per_expert in experts.items():
        if sorted(per_expert) != list(range(len(per_expert))):
            raise HFFormatError(f"experts of {stacked} are not numbered 0..{len(per_expert) - 1}")
        out[stacked] = torch.stack([per_expert[j] for j in range(len(per_expert))])
    if cfg.attention_type == "mla" and rope_interleave:
        _convert_mla_rope(out, cfg, inverse=False)
    _check_against_model(out, cfg, reward)
    return out


def _layer_name(idx: int, rest: str, cfg: ModelConfig, names: dict[str, str]) -> Optional[str]:
    """Our name for ``model.layers.{idx}.{rest}``; None for a tensor that is deliberately dropped."""
    if idx < cfg.n_layers:
        return f"layers.{idx}.{_rename(rest, names)}"
    depth = idx - cfg.n_layers
    if depth >= cfg.mtp_depth:
        if cfg.family == "deepseek_v3":  # MTP layers not imported (transformers ignores them too)
            return None
        raise HFFormatError(f"checkpoint has layer {idx} but num_hidden_layers={cfg.n_layers}")
    if rest.startswith(_MTP_SHARED):
        return None
    for hf_part, ours in _MTP_PARTS.items():
        if rest.startswith(hf_part + "."):
            return f"mtp.{depth}.{ours}{rest[len(hf_part):]}"
    return f"mtp.{depth}.block.{_rename(rest, names)}"


def _check_against_model(sd: StateDict, cfg: ModelConfig, reward: bool = False) -> None:
    expected = _expected_shapes(cfg, reward)
    kind = "reward model" if reward else "model"
    for name, t in sd.items():
        if name not in expected:
            raise HFFormatError(f"checkpoint tensor {name!r} has no place in a {cfg.family} {kind} with this config")
        if t.shape != expected[name]:
            raise HFFormatError(f"checkpoint tensor {name!r} has shape {tuple(t.shape)}, "
                                f"the config needs {tuple(expected[name])}")
    missing = sorted(set(expected) - set(sd))
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise HFFormatError(f"checkpoint lacks the tensor {missing[0]!r}{more}")


# ---------------------------------------------------------------- ours → HF
def state_dict_to_hf(sd: StateDict, cfg: ModelConfig, reward: bool = False) -> StateDict:
    """Our tensor names/layouts → Hugging Face ones (DeepSeek-V3 RoPE rows interleaved).

    ``reward``: ``sd`` is a `RewardModel`'s (no ``lm_head``, no MTP, a ``score.weight``), written
    as a ``*ForSequenceClassification``.
    """
    if reward:
        cfg = reward_backbone_config(cfg)
    _check_against_model(sd, cfg, reward)
    if cfg.family == "mamba2":
        return mamba2_state_dict_to_hf(sd)
    sd = dict(sd)
    if cfg.attention_type == "mla":
        _convert_mla_rope(sd, cfg, inverse=True)
    back = {ours: hf for hf, ours in _module_renames(cfg).items()}
    out: StateDict = {}
    for name, t in sd.items():
        if name == "embed.weight":
            out["model.embed_tokens.weight"] = t
        elif name in ("lm_head.weight", SCORE):  # the same names in both
            out[name] = t
        elif name == "norm.weight":
            out["model.norm.weight"] = t
        elif name.startswith("layers."):
            _, idx, rest = name.split(".", 2)
            _put_layer(out, f"model.layers.{idx}.", _rename(rest, back), t)
        elif name.startswith("mtp."):
            _, depth, rest = name.split(".", 2)
            prefix = f"model.layers.{cfg.n_layers + int(depth)}."
            ours_part, _, tail = rest.partition(".")
            hf_part = {v: k for k, v in _MTP_PARTS.items()}.get(ours_part)
            if hf_part is not None:
                out[f"{prefix}{hf_part}.{tail}"] = t
            else:  # block.*
                _put_layer(out, prefix, _rename(tail, back), t)
        else:
            raise HFFormatError(f"tensor {name!r} has no Hugging Face counterpart")
    for depth in range(cfg.mtp_depth):  # DeepSeek's MTP layers carry their own embedding / head copies
        prefix = f"model.layers.{cfg.n_layers + depth}."
        out[prefix + "embed_tokens.weight"] = sd["embed.weight"]
        out[prefix + "shared_head.head.weight"] = sd.get("lm_head.weight", sd["embed.weight"])
    return out


def _put_layer(out: StateDict, prefix: str, rest: str, t: torch.Tensor) -> None:
    """Write one layer tensor, splitting stacked experts (E, ...) into per-expert matrices."""
    parts = rest.split(".")
    if len(parts) == 3 and parts[:2] == ["mlp", "experts"] and parts[2] in _EXPERT_PROJS:
        for j in range(t.shape[0]):
            out[f"{prefix}mlp.experts.{j}.{parts[2]}.weight"] = t[j]
    else:
        out[prefix + rest] = t


# ---------------------------------------------------------------- directories
def _weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        return [path / f for f in sorted(set(weight_map.values()))]
    if (path / "model.safetensors").is_file():
        return [path / "model.safetensors"]
    files = sorted(path.glob("*.safetensors"))
    if files:
        return files
    if any(path.glob("pytorch_model*.bin")) or any(path.glob("*.pt")):
        raise HFFormatError(f"{path} has only pickle weights (.bin/.pt); only safetensors are read "
                            "(re-save it with safe_serialization=True)")
    raise HFFormatError(f"{path} has no *.safetensors weights")


def read_hf_config(path: Union[str, os.PathLike]) -> dict:
    """The ``config.json`` dict of a Hugging Face model directory."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise HFFormatError(f"{path} is not a Hugging Face model directory (no config.json)")
    try:
        return json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise HFFormatError(f"{path / 'config.json'} is not valid JSON: {e}") from None


def is_reward_config(hf: dict) -> bool:
    """Whether a ``config.json`` dict describes a ``*ForSequenceClassification`` (a reward model)."""
    return any(str(a).endswith(SEQ_CLS) for a in hf.get("architectures") or [])


def _architecture(hf: dict) -> str:
    return ", ".join(map(str, hf.get("architectures") or [])) or "no architectures field"


def _read_weights(path: Path) -> StateDict:
    raw: StateDict = {}
    for file in _weight_files(path):
        if not file.is_file():
            raise HFFormatError(f"weight file {file.name} listed in the index is missing from {path}")
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for key in f.keys():
                raw[key] = f.get_tensor(key)
    return raw


def load_hf_dir(path: Union[str, os.PathLike]) -> tuple[ModelConfig, StateDict]:
    """Read a Hugging Face causal-LM directory → (`ModelConfig`, our state dict), CPU tensors.

    A sequence-classification (reward) directory is refused: use `load_hf_reward_dir`.
    """
    path = Path(path)
    hf = read_hf_config(path)
    if is_reward_config(hf):
        raise HFFormatError(f"{path} is a reward model ({_architecture(hf)}), not a causal language model")
    cfg = config_from_hf(hf)  # an unsupported config fails here, before any weights are read
    raw = _read_weights(path)
    if SCORE in raw:
        raise HFFormatError(f"{path} holds a {SCORE!r} reward head: it is a reward model, not a causal language model")
    if cfg.family == "deepseek_v3" and any(k.startswith(f"model.layers.{cfg.n_layers}.") for k in raw):
        cfg = config_from_hf(hf, with_mtp=True)  # the checkpoint carries the MTP layers
    return cfg, state_dict_from_hf(raw, cfg, rope_interleave=hf.get("rope_interleave", True))


def load_hf_reward_dir(path: Union[str, os.PathLike]) -> tuple[ModelConfig, StateDict]:
    """Read a Hugging Face ``*ForSequenceClassification`` directory with one label →
    (`ModelConfig`, a `RewardModel` state dict with ``score.weight``), CPU tensors.

    A causal LM (or a classifier with more than one label) is refused with `HFFormatError`.
    """
    path = Path(path)
    hf = read_hf_config(path)
    cfg = config_from_hf(hf)  # no MTP modules: a reward model has none (DeepSeek's are dropped)
    if hf.get("architectures") and not is_reward_config(hf):
        raise HFFormatError(f"{path} is a causal language model ({_architecture(hf)}), not a reward model "
                            f"(a *{SEQ_CLS} with one label)")
    raw = _read_weights(path)
    score = raw.get(SCORE)
    if score is None:
        raise HFFormatError(f"{path} has no {SCORE!r} head: it is not a reward model (a *{SEQ_CLS} with one label)")
    if score.dim() != 2 or score.shape[0] != 1:
        raise HFFormatError(f"{path}: {SCORE} has shape {tuple(score.shape)}; a reward model has one label "
                            f"(num_labels=1, shape (1, {cfg.dim}))")
    return cfg, state_dict_from_hf(raw, cfg, rope_interleave=hf.get("rope_interleave", True), reward=True)


def reward_architecture(family: str) -> str:
    """transformers' sequence-classification class of one of our families (Gemma 3: the text model's)."""
    if family not in HF_NAMES:
        raise HFFormatError(f"family {family!r} has no Hugging Face counterpart (supported: {', '.join(HF_NAMES)})")
    if family == "gemma3":
        return "Gemma3Text" + SEQ_CLS
    return HF_NAMES[family][1].replace("ForCausalLM", SEQ_CLS)


def _write_hf_dir(hf: dict, tensors: StateDict, path: Path) -> Path:
    """config.json + model.safetensors (shared storage un-shared; the weights file replaced atomically)."""
    path.mkdir(parents=True, exist_ok=True)
    out, seen = {}, set()
    for name, t in tensors.items():
        t = t.detach().to("cpu").contiguous()
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.shape)
        out[name] = t.clone() if key in seen else t  # safetensors refuses shared storage
        seen.add(key)
    tmp = path / ".model.safetensors.tmp"
    save_file(out, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, path / "model.safetensors")
    (path / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    return path


def save_hf_dir(
    cfg: ModelConfig, sd: StateDict, path: Union[str, os.PathLike], extra_config: Optional[dict] = None
) -> Path:
    """Write ``config.json`` + ``model.safetensors`` loadable by ``AutoModelForCausalLM.from_pretrained``.

    ``extra_config`` adds fields to config.json (e.g. ``bos_token_id`` / ``eos_token_id``).
    """
    hf = config_to_hf(cfg)
    hf["torch_dtype"] = str(sd["embed.weight"].dtype).removeprefix("torch.")
    hf.update(extra_config or {})
    return _write_hf_dir(hf, state_dict_to_hf(sd, cfg), Path(path))


def save_hf_reward_dir(
    cfg: ModelConfig, sd: StateDict, path: Union[str, os.PathLike], pad_token_id: int,
    extra_config: Optional[dict] = None,
) -> Path:
    """Write a `RewardModel` state dict as a directory ``AutoModelForSequenceClassification``
    loads (``<Family>ForSequenceClassification``, one label, ``pad_token_id`` set)."""
    cfg = reward_backbone_config(cfg)
    hf = config_to_hf(cfg)
    hf.update(architectures=[reward_architecture(cfg.family)], id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0},
              torch_dtype=str(sd["embed.weight"].dtype).removeprefix("torch."))
    hf.update(extra_config or {})
    hf["pad_token_id"] = pad_token_id
    return _write_hf_dir(hf, state_dict_to_hf(sd, cfg, reward=True), Path(path))
