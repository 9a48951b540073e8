"""The model SFT starts from, built for full-parameter, LoRA or QLoRA training.

`BaseModelSource.open` reads ``checkpointing.init_from``: one of our checkpoint directories
(`utils.checkpoint`: config.json + model.safetensors) or a Hugging Face model directory
(``config.json`` with a ``model_type``, imported through `model.hf.load_hf_dir`).

`build_sft_model` builds the `Transformer` on the meta device and fills it *one unit at a time*
(the embedding, each block, the final norm, the head): the unit's base weights are read
(a checkpoint file is opened per unit, so the pages read are released after it), assigned
without a copy, converted, and moved to the device before the next unit is read. So no more
than one unit ever exists in the base's own precision — what lets QLoRA load a model whose
full-precision weights would not fit (Hugging Face directories are read whole by
`load_hf_dir`, then released unit by unit). Per method:

* ``full``: every parameter in fp32 (the master weights; AMP computes in bf16 / fp16).
* ``lora``: the frozen base in the compute dtype (nothing trains it, so no fp32 master copy),
  adapters (`model.lora.apply_lora`) in fp32.
* ``qlora``: every linear layer and stacked MoE expert quantised to NF4 from the base's own
  precision (`model.qlinear.quantize_model`), computing in the compute dtype; the output
  head stays dense unless ``qlora.quantize_head``; then adapters as for LoRA.

MoE routers keep the base's fp32 weights in every case (`model.build.keep_fp32_modules`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import torch
from pydantic import ValidationError
from safetensors import safe_open
from torch import nn

from finetune.config import SFTConfig
from model.build import keep_fp32_modules
from model.config import ModelConfig
from model.hf import HFFormatError, is_reward_config, load_hf_dir, load_hf_reward_dir
from model.lora import apply_lora
from model.moe import Router
from model.qlinear import NF4Linear, path_matches, quantize_model, set_submodule
from model.reward import RewardModel
from model.transformer import Transformer
from utils.checkpoint import CAUSAL_LM, REWARD_MODEL, TASK_KEY
from utils.errors import UserError

ADAPTER_MARKERS = (".base_layer.", ".lora_A", ".lora_B", ".qweight.")  # names only adapter/4-bit models have
Tensors = dict[str, torch.Tensor]


@dataclass
class BaseModelSource:
    """Where the base weights come from. Its `config` is known before any weight is read;
    a Hugging Face directory's weights are read with it and handed out once."""

    path: Path
    kind: Literal["checkpoint", "huggingface"]
    config: ModelConfig
    _hf_state: Optional[Tensors] = field(default=None, repr=False)
    task: str = CAUSAL_LM  # CAUSAL_LM or REWARD_MODEL (config.json "task")

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
            reward = is_reward_config(raw)  # a *ForSequenceClassification directory
            try:
                config, state = load_hf_reward_dir(path) if reward else load_hf_dir(path)
            except HFFormatError as e:
                raise UserError(f"{what}: {e}") from None
            return cls(path, "huggingface", config, state, task=REWARD_MODEL if reward else CAUSAL_LM)
        raw.pop("format_version", None)
        task = raw.pop(TASK_KEY, CAUSAL_LM)
        if not (path / "model.safetensors").is_file():
            raise UserError(f"{what} has no model.safetensors")
        try:
            config = ModelConfig(**raw)
        except ValidationError as e:
            err = e.errors()[0]
            raise UserError(f"{what}: config.json is not a model config "
                            f"({'.'.join(map(str, err['loc']))}: {err['msg']})") from None
        names = cls(path, "checkpoint", config).names()
        wrapped = next((k for k in names if any(m in k for m in ADAPTER_MARKERS)), None)
        if wrapped is not None:
            raise UserError(f"{what} is a LoRA/QLoRA training checkpoint (it holds {wrapped!r}): start from "
                            "its merged weights (--merge_and_save) or from its base model")
        return cls(path, "checkpoint", config, task=task)

    def require_policy(self, what: str = "checkpointing.init_from") -> None:
        """Refuse a reward model where a language model (a policy) is expected."""
        if self.task == REWARD_MODEL:
            raise UserError(f"{what} {self.path} is a reward model (config.json task=reward_model), not a language "
                            "model: start from a pretrained or SFT checkpoint")

    def _hf(self) -> Tensors:
        if self._hf_state is None:
            load = load_hf_reward_dir if self.task == REWARD_MODEL else load_hf_dir
            self._hf_state = load(self.path)[1]
        return self._hf_state

    def names(self) -> list[str]:
        """Every tensor name of the base (our names)."""
        if self.kind == "huggingface":
            return list(self._hf())
        with safe_open(str(self.path / "model.safetensors"), framework="pt") as f:
            return list(f.keys())

    def take(self, names: list[str]) -> Tensors:
        """Some base tensors on the CPU, in their stored dtype. A Hugging Face directory's
        tensors are handed out once (the source forgets them; it re-reads the directory when
        asked again)."""
        if self.kind == "huggingface":
            state = self._hf()
            out = {k: state.pop(k) for k in names}
            if not state:
                self._hf_state = None
            return out
        with safe_open(str(self.path / "model.safetensors"), framework="pt") as f:
            return {k: f.get_tensor(k) for k in names}

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


# ---------------------------------------------------------------------------- building
def units(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model's top-level modules, ModuleLists (blocks, MTP modules) split into their items."""
    out: list[tuple[str, nn.Module]] = []
    for name, child in model.named_children():
        if isinstance(child, nn.ModuleList):
            out += [(f"{name}.{i}", m) for i, m in enumerate(child)]
        else:
            out.append((name, child))
    return out


REWARD_FRESH = ("score.weight",)  # a reward model built from a policy starts its score head fresh


def reward_ignored(name: str) -> bool:
    """Base tensors a reward model does not use: the LM head and the MTP modules."""
    return name == "lm_head.weight" or name.startswith("mtp.")


def check_names(source: BaseModelSource, model: nn.Module) -> None:
    expected, found = set(model.state_dict()), set(source.names())
    if isinstance(model, RewardModel):
        found = {n for n in found if not reward_ignored(n)}
        expected -= set(REWARD_FRESH) - found
    for names, what in ((expected - found, "lacks"), (found - expected, "has an unexpected")):
        if names:
            raise UserError(f"the weights of {source.path} do not fit its model config: it {what} tensor "
                            f"{sorted(names)[0]!r}" + (f" (and {len(names) - 1} more)" if len(names) > 1 else ""))


def quantize_skips(model: nn.Module, cfg: SFTConfig) -> list[str]:
    """Module paths kept dense under QLoRA: ``qlora.skip_modules`` (each must name a module)
    and the head unless ``qlora.quantize_head``."""
    q = cfg.qlora
    paths = [p for p, _ in model.named_modules() if p]
    for entry in q.skip_modules:
        if not any(path_matches(p, entry) for p in paths):
            raise UserError(f"qlora.skip_modules entry {entry!r} names no module of the model "
                            f"(e.g. {', '.join(paths[:4])})")
    return list(q.skip_modules) + ([] if q.quantize_head or model.lm_head is None else ["lm_head"])


def quantize_unit(model: nn.Module, path: str, unit: nn.Module, skips: list[str], cfg: SFTConfig,
                  compute_dtype: torch.dtype) -> nn.Module:
    """NF4 for the linear layers / experts of one unit (or the unit itself, e.g. the head)."""
    q = cfg.qlora
    options = dict(blocksize=q.blocksize, double_quant=q.double_quant, compute_dtype=compute_dtype, backend=q.backend)
    try:
        if isinstance(unit, nn.Linear):
            if any(path_matches(path, s) for s in skips):
                return unit
            new = NF4Linear.from_linear(unit, **options)
            set_submodule(model, path, new)
            return new
        keep = [p for p, _ in unit.named_modules() if p and any(path_matches(f"{path}.{p}", s) for s in skips)]
        if any(path_matches(path, s) for s in skips):
            return unit
        return quantize_model(unit, skip=keep, **options)
    except ValueError as e:
        raise UserError(f"qlora: {e}") from None


def build_sft_model(source: BaseModelSource, cfg: SFTConfig, method: str, device: torch.device,
                    compute_dtype: torch.dtype, reward: bool = False) -> nn.Module:
    """The model to train (see the module docstring), on `device`. ``cfg.model`` is the
    resolved config; LoRA/QLoRA freeze everything but the adapters.

    ``reward=True`` builds a `model.reward.RewardModel` instead: the base's LM head and MTP
    modules are left out, and the ``score`` head — fresh (N(0, 0.02²), seeded by the caller's
    RNG) unless the base is a reward model already — stays dense and in fp32.
    """
    with torch.device("meta"):
        model = RewardModel(cfg.model) if reward else Transformer(cfg.model)
    check_names(source, model)
    skips = quantize_skips(model, cfg) if method == "qlora" else []
    if reward:
        skips.append("score")
    have = set(source.names()) if reward else set()
    for path, unit in units(model):
        local = list(unit.state_dict())
        if not local:
            continue
        if reward and path == "score":
            unit.to_empty(device="cpu")
            if "score.weight" in have:
                unit.load_state_dict({"weight": source.take(["score.weight"])["score.weight"].float()})
            else:
                model.reset_score()
            unit.float().to(device)
            continue
        weights = source.take([f"{path}.{k}" for k in local])
        unit.load_state_dict({k: weights[f"{path}.{k}"] for k in local}, strict=True, assign=True)
        if method == "full":
            unit.float()
        else:
            if method == "qlora":
                unit = quantize_unit(model, path, unit, skips, cfg, compute_dtype)
            unit.to(compute_dtype)  # frozen dense weights; NF4 statistics keep their own dtypes
            for sub, m in unit.named_modules():  # routers keep the base's weights, never rounded
                if isinstance(m, Router):
                    prefix = f"{path}.{sub}." if sub else f"{path}."
                    m.load_state_dict({k: weights[prefix + k].float() for k in m.state_dict()}, assign=True)
        unit.to(device)
        del weights
    left = [n for n, t in model.state_dict().items() if t.is_meta]
    if left:
        raise RuntimeError(f"no unit of the model holds {left[0]!r}: build_sft_model.units misses a module")
    keep_fp32_modules(model)
    if method != "full":
        try:
            apply_lora(model, cfg.lora, dtype=torch.float32)
        except ValueError as e:
            raise UserError(f"lora: {e}") from None
    return model
