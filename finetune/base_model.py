"""The model SFT starts from, built for full-parameter, LoRA or QLoRA training.

`BaseModelSource.open` reads ``checkpointing.init_from``: one of our checkpoint directories
(`utils.checkpoint`: config.json + model.safetensors) or a Hugging Face model directory
(``config.json`` with a ``model_type``, imported through `model.hf.load_hf_dir`).

`build_sft_model` builds the `Transformer` on the meta device and *assigns* the base weights
to it (no second copy, no wasted random init), then:

* ``full``: every parameter in fp32 (the master weights; AMP computes in bf16 / fp16).
* ``lora``: the frozen base in the compute dtype (nothing trains it, so no fp32 master copy),
  adapters (`model.lora.apply_lora`) in fp32.
* ``qlora``: first every linear layer (and stacked MoE experts) quantised to NF4 from the
  base's own precision (`model.qlinear.quantize_model`), computing in the compute dtype;
  the output head stays in the compute dtype unless ``qlora.quantize_head``; then as LoRA.

MoE routers stay in fp32 in every case (`model.build.keep_fp32_modules`).
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import torch
from pydantic import ValidationError
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from finetune.config import SFTConfig
from model.build import keep_fp32_modules
from model.config import ModelConfig
from model.hf import HFFormatError, load_hf_dir
from model.lora import apply_lora
from model.qlinear import path_matches, quantize_model
from model.transformer import Transformer
from utils.errors import UserError

logger = logging.getLogger(__name__)

ADAPTER_MARKERS = (".base_layer.", ".lora_A", ".lora_B", ".qweight.")  # names only adapter/4-bit models have


@dataclass
class BaseModelSource:
    """Where the base weights come from; its `config` is known before any weight is read
    (for Hugging Face directories the weights are read with it and handed over once)."""

    path: Path
    kind: Literal["checkpoint", "huggingface"]
    config: ModelConfig
    _hf_state: Optional[dict[str, torch.Tensor]] = field(default=None, repr=False)

    @classmethod
    def open(cls, path: Path) -> "BaseModelSource":
        path = Path(path)
        what = f"checkpointing.init_from {path}"
        if not path.is_dir():
            raise UserError(f"{what}: no such directory")
        if not (path / "config.json").is_file():
            hint = (" (it holds LoRA adapters only: start from its base model, or from a checkpoint written "
                    "with --merge_and_save)") if (path / "adapter_config.json").is_file() else ""
            raise UserError(f"{what} is neither a checkpoint nor a Hugging Face model directory (no config.json){hint}")
        try:
            raw = json.loads((path / "config.json").read_text())
        except json.JSONDecodeError as e:
            raise UserError(f"{what}: config.json is not valid JSON ({e})") from None
        if "model_type" in raw:
            try:
                config, state = load_hf_dir(path)
            except HFFormatError as e:
                raise UserError(f"{what}: {e}") from None
            return cls(path, "huggingface", config, state)
        raw.pop("format_version", None)
        if not (path / "model.safetensors").is_file():
            raise UserError(f"{what} has no model.safetensors")
        try:
            config = ModelConfig(**raw)
        except ValidationError as e:
            err = e.errors()[0]
            raise UserError(f"{what}: config.json is not a model config "
                            f"({'.'.join(map(str, err['loc']))}: {err['msg']})") from None
        with safe_open(str(path / "model.safetensors"), framework="pt") as f:
            wrapped = next((k for k in f.keys() if any(m in k for m in ADAPTER_MARKERS)), None)
        if wrapped is not None:
            raise UserError(f"{what} is a LoRA/QLoRA training checkpoint (it holds {wrapped!r}): start from "
                            "its merged weights (--merge_and_save) or from its base model")
        return cls(path, "checkpoint", config)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The base weights with our names, on the CPU, in the dtype they were stored in."""
        if self._hf_state is not None:
            state, self._hf_state = self._hf_state, None  # handed over: the caller owns the memory now
            return state
        if self.kind == "huggingface":
            return load_hf_dir(self.path)[1]
        return load_file(str(self.path / "model.safetensors"))

    @property
    def tokenizer_file(self) -> Optional[Path]:
        file = self.path / "tokenizer.json"
        return file if file.is_file() else None


def check_base_tokenizer(source: BaseModelSource, tokenizer_hash: str) -> None:
    """A base that carries its tokenizer must carry the one the SFT data was encoded with."""
    from data_pipeline.tokenizer import tokenizer_hash as hash_of

    if source.tokenizer_file is not None and hash_of(source.tokenizer_file) != tokenizer_hash:
        raise UserError(f"the base model {source.path} was trained with another tokenizer than data.tokenizer_dir: "
                        "point data.tokenizer_dir at the base's tokenizer and rebuild the SFT bins with it")


def load_base(source: BaseModelSource, cfg: ModelConfig) -> Transformer:
    """The base weights in a `Transformer` built for `cfg` (the resolved config), on the CPU."""
    with torch.device("meta"):
        model = Transformer(cfg)
    state = source.state_dict()
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        detail = lines[1] if len(lines) > 1 else lines[0]
        raise UserError(f"the weights of {source.path} do not fit its model config: {detail[:300]}") from None
    return model


def quantize_base(model: nn.Module, cfg: SFTConfig, compute_dtype: torch.dtype) -> nn.Module:
    """NF4 for every linear layer and stacked expert, except the head (unless
    ``qlora.quantize_head``) and ``qlora.skip_modules`` (each must name a module)."""
    q = cfg.qlora
    paths = [p for p, _ in model.named_modules() if p]
    for entry in q.skip_modules:
        if not any(path_matches(p, entry) for p in paths):
            raise UserError(f"qlora.skip_modules entry {entry!r} names no module of the model "
                            f"(e.g. {', '.join(paths[:4])})")
    skip = list(q.skip_modules) + ([] if q.quantize_head or model.lm_head is None else ["lm_head"])
    try:
        return quantize_model(model, skip=skip, blocksize=q.blocksize, double_quant=q.double_quant,
                              compute_dtype=compute_dtype, backend=q.backend)
    except ValueError as e:
        raise UserError(f"qlora: {e}") from None


def build_sft_model(source: BaseModelSource, cfg: SFTConfig, method: str, device: torch.device,
                    compute_dtype: torch.dtype) -> nn.Module:
    """The model to train (see the module docstring), on `device`. ``cfg.model`` is the
    resolved config; LoRA/QLoRA freeze everything but the adapters."""
    model = load_base(source, cfg.model)
    if method == "full":
        model.float()
    else:
        if method == "qlora":
            quantize_base(model, cfg, compute_dtype)
        model.to(compute_dtype)  # the frozen dense weights; NF4 statistics keep their own dtypes
    keep_fp32_modules(model)
    model.to(device)
    if method != "full":
        try:
            apply_lora(model, cfg.lora, dtype=torch.float32)
        except ValueError as e:
            raise UserError(f"lora: {e}") from None
    return model
