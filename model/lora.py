"""LoRA: low-rank adapters on frozen weights (Hu et al. 2021, "LoRA: Low-Rank Adaptation of LLMs").

A targeted linear map W (out, in) becomes ``W x + (alpha / r) * B A dropout(x)`` with A (r, in)
initialised like ``nn.Linear`` (Kaiming-uniform, a = sqrt(5), as Hugging Face PEFT does) and
B (out, r) zero, so the adapted model starts equal to the base. Everything but A and B is
frozen. Merging adds ``(alpha / r) B A`` into W (no extra inference cost); unmerging subtracts it.

Targets: a list of names matched as suffixes of module paths (PEFT's ``target_modules``), a
regex matched against the whole path (PEFT's regex form), or ``"auto"``: every linear layer
under an attention (``attn``) or FFN (``ffn``) module, MLA's low-rank projections and the MoE
experts included (the router is not a linear layer and is never adapted). Over a 4-bit base
(`model.qlinear`) this is QLoRA (Dettmers et al. 2023).

- `LoraLinear` wraps an ``nn.Linear`` or `NF4Linear` as ``base_layer``. Its ``.weight`` is the
  *effective* weight W + (alpha / r) B A, so code that reads a projection's weight instead of
  calling it (MLA's absorbed decoding reads ``kv_b_proj.weight``) sees the adapter too.
- `LoraExperts` adapts the stacked routed experts: per-expert A (E, r, in) and B (E, out, r) for
  each chosen projection, applied inside each expert (low-rank path, with dropout) through the
  ``expert_weights`` / ``expert`` hooks of `StackedExperts`.

Module paths of the base change (``q_proj.weight`` -> ``q_proj.base_layer.weight``); the plain
names come back from `model.lora_io.merged_state_dict`. Saving and loading adapters (PEFT's file
layout) is in `model.lora_io`.
"""
from __future__ import annotations

import contextlib
import math
import re
from typing import Iterator, Literal, Optional, Union

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, field_validator
from torch import nn

from model.moe import StackedExperts
from model.qlinear import NF4Experts, NF4Linear, expert_forward, expert_proj_names, set_submodule

AUTO_PARENTS = ("attn", "ffn")  # "auto" targets: linears with one of these among their path components


class LoraConfig(BaseModel):
    """LoRA hyper-parameters. ``target_regex``, when set, replaces ``target_modules``."""

    model_config = ConfigDict(extra="forbid")

    r: PositiveInt = 8
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: Union[Literal["auto"], list[str]] = "auto"
    target_regex: Optional[str] = None

    @field_validator("target_modules")
    @classmethod
    def _non_empty(cls, v):
        if isinstance(v, list) and not v:
            raise ValueError("target_modules is empty; list module names or use 'auto'")
        return v

    @field_validator("target_regex")
    @classmethod
    def _compiles(cls, v):
        if v is not None:
            try:
                re.compile(v)
            except re.error as e:
                raise ValueError(f"target_regex {v!r} is not a valid regular expression: {e}") from None
        return v


def init_lora_A(a: torch.Tensor) -> None:
    """Kaiming-uniform (a = sqrt(5)) per (r, in) matrix, i.e. U(-1/sqrt(in), 1/sqrt(in)) like nn.Linear."""
    for m in a.view(-1, *a.shape[-2:]):
        nn.init.kaiming_uniform_(m, a=math.sqrt(5))


# ---------------------------------------------------------------------------- modules
class LoraLinear(nn.Module):
    """``base_layer(x) + scaling * lora_B(lora_A(dropout(x)))``, or just the base once merged."""

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float, dtype: Optional[torch.dtype] = None):
        super().__init__()
        if not isinstance(base, (nn.Linear, NF4Linear)):
            raise TypeError(f"LoRA wraps nn.Linear or NF4Linear, got {type(base).__name__}")
        self.base_layer = base
        self.r, self.alpha, self.dropout_p = r, alpha, dropout
        self.scaling = alpha / r
        quantized = isinstance(base, NF4Linear)
        device = base.qweight.packed.device if quantized else base.weight.device
        dtype = dtype or (base.compute_dtype if quantized else base.weight.dtype)
        self.lora_A = nn.Linear(base.in_features, r, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(r, base.out_features, bias=False, device=device, dtype=dtype)
        with torch.no_grad():
            init_lora_A(self.lora_A.weight)
            self.lora_B.weight.zero_()
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self.disabled = False  # `disable_adapters`: compute the base alone (e.g. a DPO reference)

    @property
    def bias(self) -> Optional[torch.Tensor]:
        return self.base_layer.bias

    def delta_weight(self) -> torch.Tensor:
        """scaling * B A (out, in), in fp32 or the adapter dtype if wider."""
        a, b = self.lora_A.weight, self.lora_B.weight
        dtype = torch.promote_types(a.dtype, torch.float32)
        return (b.to(dtype) @ a.to(dtype)) * self.scaling

    @property
    def weight(self) -> torch.Tensor:
        """The effective weight (out, in): base + scaling * B A unless already merged (differentiable in A, B)."""
        w = self.base_layer.weight
        if self.merged or self.disabled:
            return w
        return (w.to(torch.promote_types(w.dtype, torch.float32)) + self.delta_weight()).to(w.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (..., in) -> (..., out)
        out = self.base_layer(x)
        if self.merged or self.disabled:
            return out
        a = self.lora_A.weight
        lora = self.lora_B(self.lora_A(self.lora_dropout(x.to(a.dtype))))  # (..., out)
        return out + (lora * self.scaling).to(out.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """W += scaling * B A (exact up to one rounding in W's dtype)."""
        if self.merged:
            return
        w = _mergeable(self.base_layer.weight if isinstance(self.base_layer, nn.Linear) else None, "a 4-bit linear")
        w.copy_((w.to(torch.promote_types(w.dtype, torch.float32)) + self.delta_weight()).to(w.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """W -= scaling * B A."""
        if not self.merged:
            return
        w = self.base_layer.weight
        w.copy_((w.to(torch.promote_types(w.dtype, torch.float32)) - self.delta_weight()).to(w.dtype))
        self.merged = False

    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        """PEFT-style names below this module's path -> tensors."""
        return {"lora_A.weight": self.lora_A.weight, "lora_B.weight": self.lora_B.weight}

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, dropout={self.dropout_p}, merged={self.merged}"


class LoraExperts(StackedExperts):
    """Stacked routed experts (dense or NF4) with per-expert LoRA on the projections ``names``.

    ``lora_A[name]`` (E, r, in), ``lora_B[name]`` (E, out, r); routing and dispatch are the
    parent's ``forward``, which calls our ``expert_weights`` / ``expert``.
    """

    grouped_gemm = False  # the loop calls our expert_weights / expert

    def __init__(
        self, base: StackedExperts, names: list[str], r: int, alpha: float, dropout: float,
        dtype: Optional[torch.dtype] = None,
    ):
        nn.Module.__init__(self)  # the parent's __init__ would allocate a second set of experts
        self.base_layer = base
        self.n_experts, self.act, self.is_glu = base.n_experts, base.act, base.is_glu
        self.proj_names = expert_proj_names(base)
        unknown = set(names) - set(self.proj_names)
        if unknown:
            raise ValueError(f"experts have no projection {sorted(unknown)}; they have {self.proj_names}")
        self.names = [n for n in self.proj_names if n in names]
        self.r, self.alpha, self.dropout_p = r, alpha, dropout
        self.scaling = alpha / r
        quantized = isinstance(base, NF4Experts)
        self.lora_A, self.lora_B = nn.ParameterDict(), nn.ParameterDict()
        for name in self.names:
            w = self._base_dense(name) if not quantized else None
            shape = getattr(base, name).shape if quantized else w.shape[1:]
            device = getattr(base, name).packed.device if quantized else w.device
            pdtype = dtype or (base.compute_dtype if quantized else w.dtype)
            out_f, in_f = shape
            a = torch.empty(self.n_experts, r, in_f, device=device, dtype=pdtype)
            init_lora_A(a)
            self.lora_A[name] = nn.Parameter(a)
            self.lora_B[name] = nn.Parameter(torch.zeros(self.n_experts, out_f, r, device=device, dtype=pdtype))
        self.merged = False
        self.disabled = False  # `disable_adapters`: compute the base alone

    def _base_dense(self, name: str) -> torch.Tensor:
        return getattr(self.base_layer, name)

    def delta_weight(self, name: str) -> torch.Tensor:
        """scaling * B_e A_e for every expert: (E, out, in), fp32 or wider."""
        a, b = self.lora_A[name], self.lora_B[name]
        dtype = torch.promote_types(a.dtype, torch.float32)
        return torch.bmm(b.to(dtype), a.to(dtype)) * self.scaling

    def expert_weights(self) -> list[tuple]:
        """Per expert, for each projection: (base weight, A_e or None, B_e or None)."""
        base = self.base_layer.expert_weights()
        adapters = []
        for name in self.proj_names:
            if name in self.names and not (self.merged or self.disabled):
                adapters.append(list(zip(self.lora_A[name].unbind(0), self.lora_B[name].unbind(0))))
            else:
                adapters.append([(None, None)] * self.n_experts)
        return [
            tuple((w, *adapters[j][e]) for j, w in enumerate(base[e])) for e in range(self.n_experts)
        ]

    def _linear(self, x: torch.Tensor, w_ab: tuple) -> torch.Tensor:
        w, a, b = w_ab
        out = self.base_layer.linear(x, w) if isinstance(self.base_layer, NF4Experts) else F.linear(x, w)
        if a is None:
            return out
        h = F.dropout(x.to(a.dtype), self.dropout_p, self.training)
        return out + (F.linear(F.linear(h, a), b) * self.scaling).to(out.dtype)  # (n, out)

    def expert(self, weights: tuple, x: torch.Tensor) -> torch.Tensor:
        return expert_forward(weights, x, self.act, self.is_glu, self._linear)

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            return
        for name in self.names:
            w = _mergeable(None if isinstance(self.base_layer, NF4Experts) else self._base_dense(name), "4-bit experts")
            w.copy_((w.to(torch.promote_types(w.dtype, torch.float32)) + self.delta_weight(name)).to(w.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        for name in self.names:
            w = self._base_dense(name)
            w.copy_((w.to(torch.promote_types(w.dtype, torch.float32)) - self.delta_weight(name)).to(w.dtype))
        self.merged = False

    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for name in self.names:
            out[f"{name}.lora_A.weight"] = self.lora_A[name]
            out[f"{name}.lora_B.weight"] = self.lora_B[name]
        return out

    def extra_repr(self) -> str:
        return f"targets={self.names}, r={self.r}, alpha={self.alpha}, dropout={self.dropout_p}, merged={self.merged}"


def _mergeable(weight: Optional[torch.Tensor], what: str) -> torch.Tensor:
    if weight is None:
        raise ValueError(f"cannot merge LoRA into {what}: use model.lora_io.merged_state_dict for a dense copy")
    return weight


LORA_MODULES = (LoraLinear, LoraExperts)


# ---------------------------------------------------------------------------- targeting
def lora_candidates(model: nn.Module) -> list[str]:
    """Every path LoRA can adapt: linear layers (``layers.0.attn.q_proj``) and stacked-expert
    projections (``layers.1.ffn.experts.up_proj``)."""
    paths = []
    for path, module in model.named_modules():
        if isinstance(module, LORA_MODULES):
            raise ValueError(f"the model already has LoRA adapters (at {path})")
        if isinstance(module, (nn.Linear, NF4Linear)):
            paths.append(path)
        elif isinstance(module, StackedExperts):
            paths += [f"{path}.{name}" for name in expert_proj_names(module)]
    return paths


def select_targets(candidates: list[str], config: LoraConfig) -> list[str]:
    """The candidate paths ``config`` selects (see the module docstring); errors name what matched nothing."""
    if config.target_regex is not None:
        pattern = re.compile(config.target_regex)
        chosen = [p for p in candidates if pattern.fullmatch(p)]
        if not chosen:
            raise ValueError(f"target_regex {config.target_regex!r} matches no linear layer (e.g. {candidates[:3]})")
        return chosen
    if config.target_modules == "auto":
        chosen = [p for p in candidates if any(part in AUTO_PARENTS for part in p.split(".")[:-1])]
        if not chosen:
            raise ValueError("target_modules='auto' found no linear layer under an attention or FFN module")
        return chosen
    chosen = set()
    for entry in config.target_modules:
        hits = [p for p in candidates if p == entry or p.endswith("." + entry)]
        if not hits:
            leaves = sorted({p.rsplit(".", 1)[-1] for p in candidates})
            raise ValueError(f"target_modules entry {entry!r} matches no linear layer; leaf names: {leaves}")
        chosen.update(hits)
    return [p for p in candidates if p in chosen]


# ---------------------------------------------------------------------------- model-level API
def apply_lora(model: nn.Module, config: LoraConfig, dtype: Optional[torch.dtype] = None) -> nn.Module:
    """Add LoRA adapters to the modules ``config`` targets and freeze everything else, in place.

    ``dtype`` is the adapters' dtype (default: the base weight's, or the compute dtype over a
    4-bit base). Returns ``model``; only `lora_parameters` (model) require grad afterwards.
    """
    return add_adapters(model, select_targets(lora_candidates(model), config), config, dtype)


def add_adapters(
    model: nn.Module, paths: list[str], config: LoraConfig, dtype: Optional[torch.dtype] = None
) -> nn.Module:
    """Adapt exactly the candidate ``paths`` (as `lora_candidates` names them); freeze the rest."""
    for p in model.parameters():
        p.requires_grad_(False)
    experts: dict[str, list[str]] = {}
    for path in paths:
        parent, _, leaf = path.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        if isinstance(owner, StackedExperts):
            experts.setdefault(parent, []).append(leaf)
        else:
            lora = LoraLinear(model.get_submodule(path), config.r, config.alpha, config.dropout, dtype)
            set_submodule(model, path, lora)
    for path, names in experts.items():
        set_submodule(model, path, LoraExperts(model.get_submodule(path), names, config.r, config.alpha,
                                               config.dropout, dtype))
    return model


def lora_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(path, module) of every `LoraLinear` / `LoraExperts` of ``model``."""
    return [(path, m) for path, m in model.named_modules() if isinstance(m, LORA_MODULES)]


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The adapter parameters (A and B of every adapted module): what the optimizer trains."""
    params = []
    for _, m in lora_modules(model):
        params += list(m.lora_A.parameters()) + list(m.lora_B.parameters())
    return params


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (forward then costs nothing extra). Returns ``model``."""
    for _, m in lora_modules(model):
        m.merge()
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Undo `merge_lora`. Returns ``model``."""
    for _, m in lora_modules(model):
        m.unmerge()
    return model


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """``with disable_adapters(model):`` the model computes its base weights alone.

    The adapters stay in place (nothing is copied or merged): this is how a LoRA / QLoRA
    policy serves as its own reference model in DPO-style training (the base *is* the
    reference), with no second copy of the weights in memory. Merged adapters cannot be
    switched off (their delta is inside the base weight): that is an error.
    """
    modules = [m for _, m in lora_modules(model)]
    if any(m.merged for m in modules):
        raise RuntimeError("disable_adapters: some adapters are merged into their base weights; unmerge them first")
    before = [m.disabled for m in modules]
    for m in modules:
        m.disabled = True
    try:
        yield model
    finally:
        for m, b in zip(modules, before):
            m.disabled = b
