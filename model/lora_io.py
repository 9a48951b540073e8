"""Saving, loading and merging LoRA adapters (`model.lora`) in Hugging Face PEFT's file layout.

An adapter directory holds ``adapter_model.safetensors`` and ``adapter_config.json``, as PEFT
writes them (Mangrulkar et al. 2022, https://github.com/huggingface/peft):

- tensors ``base_model.model.<module path>.lora_A.weight`` (r, in) and ``.lora_B.weight`` (out, r);
  a stacked-experts projection ``...ffn.experts.up_proj`` stores (E, r, in) and (E, out, r);
- ``adapter_config.json``: ``peft_type: "LORA"``, ``task_type: "CAUSAL_LM"``, ``r``,
  ``lora_alpha``, ``lora_dropout``, ``target_modules`` (the exact module paths), ``bias: "none"``,
  ``base_model_name_or_path``.

With ``hf_names=True`` the module paths are those of the equivalent ``transformers`` model (the
renames and DeepSeek-V3 RoPE row order of `model.hf`), so ``peft.PeftModel.from_pretrained``
loads the adapter onto a base exported with `model.hf.save_hf_dir`. Routed experts (fused 3-D
parameters in transformers) and MTP modules (not built by transformers) have no such form.
Known PEFT limitation (peft 0.21, transformers 5): for DeepSeek-V3 PEFT rewrites every target
named ``*gate_proj`` / ``*up_proj`` / ``*down_proj`` to the fused routed experts, so adapters on
the dense or shared-expert FFN of that family do not reach their modules there; its attention
adapters load exactly.

`merged_state_dict` gives the plain state dict (base names, adapters folded in, 4-bit weights
dequantised) that `model.build_model` (cfg) loads strictly, for a plain checkpoint.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional, Union

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from model.hf import _convert_mla_rope, _module_renames, _rename
from model.lora import LoraConfig, LoraExperts, LoraLinear, add_adapters, lora_candidates, lora_modules
from model.nf4 import nf4_dequantize
from model.qlinear import NF4Experts, NF4Linear, NF4Weight, expert_proj_names

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
PREFIX = "base_model.model."
PathLike = Union[str, os.PathLike]


# ---------------------------------------------------------------------------- adapter tensors
def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``<module path>.lora_A.weight`` / ``.lora_B.weight`` -> tensor, for every adapted path."""
    out = {}
    for path, m in lora_modules(model):
        for name, t in m.adapter_tensors().items():
            out[f"{path}.{name}"] = t
    return out


def _adapted_paths(tensors: dict[str, torch.Tensor]) -> list[str]:
    return sorted({k.rsplit(".", 2)[0] for k in tensors})


def _lora_hparams(model: nn.Module) -> tuple[int, float, float]:
    modules = [m for _, m in lora_modules(model)]
    if not modules:
        raise ValueError("the model has no LoRA adapters (call apply_lora first)")
    hparams = {(m.r, m.alpha, m.dropout_p) for m in modules}
    if len(hparams) > 1:
        raise ValueError(f"adapters with different (r, alpha, dropout) cannot share one config: {sorted(hparams)}")
    return hparams.pop()


def _to_hf_names(tensors: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Our adapter names -> transformers module paths; B rows follow the RoPE row order of `model.hf`."""
    cfg = model.cfg
    back = {ours: hf for hf, ours in _module_renames(cfg).items()}
    out = {}
    for name, t in tensors.items():
        path, ab, _ = name.rsplit(".", 2)  # "<path>.lora_A.weight"
        if isinstance(model.get_submodule(path.rpartition(".")[0]), LoraExperts):
            raise ValueError(f"{path}: adapters on routed experts have no PEFT form for the transformers model")
        if path.startswith("mtp."):
            raise ValueError(f"{path}: MTP modules have no transformers counterpart")
        if ab == "lora_B" and cfg.attention_type == "mla":
            rows = {f"{path}.weight": t}
            _convert_mla_rope(rows, cfg, inverse=True)  # in place; only q / kv_a projections change
            t = rows[f"{path}.weight"]
        if path.startswith("layers."):
            _, idx, rest = path.split(".", 2)
            path = f"model.layers.{idx}.{_rename(rest, back)}"
        out[f"{path}.{ab}.weight"] = t
    return out


def _from_hf_names(tensors: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """The inverse of `_to_hf_names`: transformers module paths (a PEFT adapter of an exported or
    Hugging Face model) -> ours; B rows back to our RoPE row order."""
    names = _module_renames(model.cfg)
    out = {}
    for name, t in tensors.items():
        path, ab, _ = name.rsplit(".", 2)
        if path.startswith("model.layers."):
            _, _, idx, rest = path.split(".", 3)
            path = f"layers.{idx}.{_rename(rest, names)}"
        if ab == "lora_B" and model.cfg.attention_type == "mla":
            rows = {f"{path}.weight": t}
            _convert_mla_rope(rows, model.cfg, inverse=False)
            t = rows[f"{path}.weight"]
        out[f"{path}.{ab}.weight"] = t
    return out


def save_adapter(
    model: nn.Module, path: PathLike, base_model_path: Optional[str] = None, hf_names: bool = False
) -> Path:
    """Write the adapters of ``model`` to directory ``path`` (PEFT layout, see the module docstring).

    ``base_model_path`` is recorded as ``base_model_name_or_path``; ``hf_names`` writes
    transformers module paths for PEFT (our own paths otherwise, which `load_adapter` reads).
    """
    r, alpha, dropout = _lora_hparams(model)
    tensors = adapter_state_dict(model)
    if hf_names:
        tensors = _to_hf_names(tensors, model)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha, "lora_dropout": dropout,
        "target_modules": _adapted_paths(tensors), "bias": "none", "fan_in_fan_out": False,
        "base_model_name_or_path": None if base_model_path is None else str(base_model_path),
    }
    files = {PREFIX + k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    tmp = path / f".{ADAPTER_WEIGHTS}.tmp"
    save_file(files, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, path / ADAPTER_WEIGHTS)
    (path / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return path


def read_adapter(path: PathLike) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """(config, ``<module path>.lora_{A,B}.weight`` -> tensor) of an adapter directory."""
    path = Path(path)
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path} is not a LoRA adapter directory (no {name})")
    try:
        raw = json.loads((path / ADAPTER_CONFIG).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path / ADAPTER_CONFIG} is not valid JSON: {e}") from None
    if raw.get("peft_type") != "LORA":
        raise ValueError(f"{path / ADAPTER_CONFIG}: peft_type is {raw.get('peft_type')!r}, only 'LORA' is supported")
    missing = [k for k in ("r", "lora_alpha", "target_modules") if k not in raw]
    if missing:
        raise ValueError(f"{path / ADAPTER_CONFIG} lacks the field {missing[0]!r}")
    config = LoraConfig(r=raw["r"], alpha=raw["lora_alpha"], dropout=raw.get("lora_dropout", 0.0),
                        target_modules=list(raw["target_modules"]))
    tensors = {}
    for key, t in load_file(str(path / ADAPTER_WEIGHTS)).items():
        if not key.startswith(PREFIX):
            raise ValueError(f"{path / ADAPTER_WEIGHTS}: tensor {key!r} does not start with {PREFIX!r}")
        tensors[key[len(PREFIX):]] = t
    return config, tensors


@torch.no_grad()
def load_adapter(model: nn.Module, path: PathLike, dtype: Optional[torch.dtype] = None) -> nn.Module:
    """Load an adapter written by `save_adapter` (our module paths, or transformers' as PEFT
    writes them for the exported model) into ``model``, in place.

    A model without adapters gets them on exactly the saved paths (as `model.lora.apply_lora`
    would, everything else frozen); a model with adapters must have the same paths. Shapes are
    checked. Returns ``model``.
    """
    config, tensors = read_adapter(path)
    if any(k.startswith("model.layers.") for k in tensors) and hasattr(model, "cfg"):
        tensors = _from_hf_names(tensors, model)  # written for the transformers model (PEFT)
    saved = _adapted_paths(tensors)
    if not lora_modules(model):
        candidates = set(lora_candidates(model))
        unknown = [p for p in saved if p not in candidates]
        if unknown:
            raise ValueError(f"adapter {path} targets {unknown[0]!r}, which this model does not have as a linear layer"
                             + (" (it uses transformers module names: saved with hf_names=True?)"
                                if unknown[0].startswith("model.") else ""))
        add_adapters(model, saved, config, dtype)
    if any(m.merged for _, m in lora_modules(model)):
        raise ValueError("the model's adapters are merged; call unmerge_lora before loading other adapters")
    current = adapter_state_dict(model)
    if sorted(current) != sorted(tensors):
        missing = sorted(set(current) - set(tensors)) or sorted(set(tensors) - set(current))
        raise ValueError(f"adapter {path} does not match the model's adapters (first difference: {missing[0]!r})")
    for name, t in tensors.items():
        if current[name].shape != t.shape:
            raise ValueError(f"adapter tensor {name!r} has shape {tuple(t.shape)}, the model needs "
                             f"{tuple(current[name].shape)} (different r?)")
        current[name].copy_(t)
    return model


# ---------------------------------------------------------------------------- merged checkpoint
@torch.no_grad()
def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The plain state dict of ``model`` with every adapter folded in and 4-bit weights dequantised.

    Names are the base model's (no ``base_layer``, ``lora_*`` or NF4 buffers); dtypes are the
    original weights'. ``model`` is not changed. Load it with ``build_model(cfg).load_state_dict``.
    """
    out: dict[str, torch.Tensor] = {}
    special: list[str] = []  # module paths whose entries are rebuilt below
    for path, m in model.named_modules():
        if any(path == s or path.startswith(s + ".") for s in special):
            continue
        if isinstance(m, (LoraLinear, NF4Linear)):
            special.append(path)
            out[f"{path}.weight"] = _linear_weight(m)
            if m.bias is not None:
                out[f"{path}.bias"] = m.bias.detach().clone()
        elif isinstance(m, (LoraExperts, NF4Experts)):
            special.append(path)
            base = m.base_layer if isinstance(m, LoraExperts) else m
            for name in expert_proj_names(base):
                out[f"{path}.{name}"] = _expert_weight(m, base, name)
    for key, t in model.state_dict().items():
        if not any(key.startswith(s + ".") for s in special):
            out[key] = t.detach().clone()
    return out


def _linear_weight(m: nn.Module) -> torch.Tensor:
    """Weight (out, in) of a LoRA / 4-bit linear with the adapter folded in, in its original dtype."""
    base = m.base_layer if isinstance(m, LoraLinear) else m
    if isinstance(base, NF4Linear):
        w, dtype = nf4_dequantize(base.qweight[0], torch.float32), base.qweight.dtype
    else:
        dtype = base.weight.dtype
        w = base.weight.detach().to(torch.promote_types(dtype, torch.float32))
    if isinstance(m, LoraLinear) and not m.merged:
        w = w + m.delta_weight()
    return w.to(dtype).clone()


def _expert_weight(m: nn.Module, base: nn.Module, name: str) -> torch.Tensor:
    """Stacked expert matrix ``name`` (E, out, in) with the adapter folded in, in its original dtype."""
    if isinstance(base, NF4Experts):
        q: NF4Weight = getattr(base, name)
        w, dtype = q.dequantize(torch.float32), q.dtype
    else:
        w = getattr(base, name).detach()
        dtype = w.dtype
        w = w.to(torch.promote_types(dtype, torch.float32))
    if isinstance(m, LoraExperts) and name in m.names and not m.merged:
        w = w + m.delta_weight(name)
    return w.to(dtype).clone()
