"""4-bit (NF4) linear layers and experts, and quantising a model for QLoRA.

QLoRA (Dettmers et al. 2023): the frozen base weights are stored in NF4 (`model.nf4`) and
dequantised to the compute dtype (bf16 or fp32) on the fly, for the forward and again for the
backward, so no full-precision copy of a weight outlives its matmul; gradients flow through the
base layers into the inputs (and from there into the LoRA adapters), never into the weights.

- `NF4Linear`: a frozen ``nn.Linear`` in NF4. ``.weight`` returns the dequantised matrix, so
  code that reads a projection's weight directly (MLA's absorbed decoding reads
  ``kv_b_proj.weight``) still works.
- `NF4Experts`: the stacked routed experts of `model.moe.StackedExperts`, each expert matrix
  quantised on its own; routing and dispatch are StackedExperts' own.
- Backends: ``"torch"`` (our dequantisation), ``"bnb"`` (``bitsandbytes.functional.dequantize_4bit``
  on the same bytes) or ``"auto"`` (bnb on CUDA when it is installed, else torch); the matmul
  is ``F.linear`` either way.
- `quantize_model` swaps a model's linears and experts in place; `weight_bytes` reports what
  the weights take in memory.
"""
from __future__ import annotations

import importlib.util
from functools import lru_cache
from typing import Callable, Literal, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from model.moe import StackedExperts
from model.nf4 import NF4_BLOCKSIZE, NF4Tensor, bnb_dequantize, nf4_dequantize, nf4_quantize

Backend = Literal["auto", "torch", "bnb"]
BACKENDS = ("auto", "torch", "bnb")
DEFAULT_SKIP = ("lm_head", "embed")


@lru_cache(maxsize=None)
def bnb_available() -> bool:
    return importlib.util.find_spec("bitsandbytes") is not None


def resolve_backend(backend: Backend, device: torch.device) -> str:
    """The backend a call on ``device`` uses: "auto" means bnb on CUDA when installed, else torch."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "bnb" if device.type == "cuda" and bnb_available() else "torch"
    if backend == "bnb" and not bnb_available():
        raise ValueError("backend='bnb' needs the bitsandbytes package (pip install bitsandbytes)")
    return backend


class _DequantMatmul(torch.autograd.Function):
    """y = x W^T where W = ``dequant()`` is rebuilt in the backward instead of being saved."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, dequant: Callable[[], torch.Tensor]) -> torch.Tensor:
        ctx.dequant = dequant
        return F.linear(x, dequant())

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad @ ctx.dequant(), None  # (..., out) @ (out, in) -> (..., in)


def nf4_linear(
    x: torch.Tensor,
    q: NF4Tensor,
    bias: Optional[torch.Tensor] = None,
    compute_dtype: torch.dtype = torch.float32,
    backend: Backend = "auto",
) -> torch.Tensor:
    """``F.linear(x, dequantize(q), bias)`` computed in ``compute_dtype``; the result has x's dtype.

    x: (..., in), q: an NF4 (out, in) matrix -> (..., out). The weight gets no gradient.
    """
    dequantize = bnb_dequantize if resolve_backend(backend, x.device) == "bnb" else nf4_dequantize
    out = _DequantMatmul.apply(x.to(compute_dtype), lambda: dequantize(q, compute_dtype))
    if bias is not None:
        out = out + bias.to(compute_dtype)
    return out.to(x.dtype)


class NF4Weight(nn.Module):
    """S NF4 matrices of one shape as stacked buffers (S = 1 for a linear, E for experts).

    Buffers: ``packed`` uint8 (S, ceil(n / 2)), ``absmax`` (S, n_blocks) fp32 or uint8 codes,
    and with double quantisation ``absmax_scale`` fp32 (S, n_blocks / 256) and
    ``absmax_offset`` fp32 (S,). The fp32 statistics stay fp32 when the module is cast.
    """

    _FP32_STATS = ("absmax", "absmax_scale", "absmax_offset")

    def __init__(self, tensors: Sequence[NF4Tensor]) -> None:
        super().__init__()
        first = tensors[0]
        self.shape, self.dtype, self.blocksize = first.shape, first.dtype, first.blocksize
        self.register_buffer("packed", torch.stack([t.packed for t in tensors]))
        self.register_buffer("absmax", torch.stack([t.absmax for t in tensors]))
        double = first.double_quant
        self.register_buffer("absmax_scale", torch.stack([t.absmax_scale for t in tensors]) if double else None)
        self.register_buffer("absmax_offset", torch.stack([t.absmax_offset for t in tensors]) if double else None)

    @classmethod
    def quantize(cls, weights: torch.Tensor, blocksize: int = NF4_BLOCKSIZE, double_quant: bool = True) -> "NF4Weight":
        """Quantise each matrix of ``weights`` (S, out, in) on its own."""
        return cls([nf4_quantize(w, blocksize, double_quant) for w in weights.detach().unbind(0)])

    def __len__(self) -> int:
        return self.packed.shape[0]

    def __getitem__(self, i: int) -> NF4Tensor:
        """Matrix i as an `NF4Tensor` (views of the buffers, no copies)."""
        double = self.absmax_scale is not None
        return NF4Tensor(
            self.packed[i], self.absmax[i], self.shape, self.dtype, self.blocksize,
            self.absmax_scale[i] if double else None, self.absmax_offset[i] if double else None,
        )

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """All S matrices, dense: (S, out, in)."""
        return torch.stack([nf4_dequantize(self[i], dtype) for i in range(len(self))])

    def _apply(self, fn, recurse=True):
        # casts (model.to(torch.bfloat16)) must not round the block scales: move them, never cast them
        stats = {k: self._buffers.pop(k) for k in self._FP32_STATS if self._buffers.get(k) is not None}
        super()._apply(fn, recurse)
        for k, t in stats.items():
            moved = t.to(self.packed.device)
            self._buffers[k] = moved if t.dtype == torch.uint8 else moved.float()
        return self


class NF4Linear(nn.Module):
    """A frozen linear layer stored in NF4: ``y = x dequant(W)^T + b`` in ``compute_dtype``."""

    def __init__(
        self, qweight: NF4Weight, bias: Optional[torch.Tensor], compute_dtype: torch.dtype, backend: Backend = "auto"
    ) -> None:
        super().__init__()
        resolve_backend(backend, torch.device("cpu"))  # validate the name now
        self.qweight = qweight
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.out_features, self.in_features = qweight.shape
        self.compute_dtype = compute_dtype
        self.backend = backend

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        blocksize: int = NF4_BLOCKSIZE,
        double_quant: bool = True,
        compute_dtype: Optional[torch.dtype] = None,
        backend: Backend = "auto",
    ) -> "NF4Linear":
        """Quantise ``linear``; ``compute_dtype`` defaults to its weight dtype."""
        qweight = NF4Weight.quantize(linear.weight.unsqueeze(0), blocksize, double_quant)
        return cls(qweight, linear.bias, compute_dtype or linear.weight.dtype, backend)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantised weight (out, in) in the compute dtype (a fresh tensor, not a parameter)."""
        return nf4_dequantize(self.qweight[0], self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (..., in) -> (..., out)
        return nf4_linear(x, self.qweight[0], self.bias, self.compute_dtype, self.backend)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"compute_dtype={self.compute_dtype}, backend={self.backend}")


def expert_forward(
    weights: Sequence, x: torch.Tensor, act: Callable, is_glu: bool,
    linear: Callable[[torch.Tensor, object], torch.Tensor],
) -> torch.Tensor:
    """One expert, ``down(act(gate(x)) * up(x))`` (GLU) or ``down(act(up(x)))``, with matmuls by ``linear``.

    ``weights`` = ([gate,] up, down) in whatever form ``linear(x, w)`` takes; x: (n, D) -> (n, D).
    """
    *gate, up_w, down_w = weights
    up = linear(x, up_w)  # (n, H)
    h = act(linear(x, gate[0])) * up if is_glu else act(up)  # (n, H)
    return linear(h, down_w)  # (n, D)


class NF4Experts(StackedExperts):
    """`StackedExperts` whose (E, ...) matrices are stored in NF4, one quantisation per expert.

    Submodules ``gate_proj`` (GLU only), ``up_proj``, ``down_proj`` are `NF4Weight` s; routing,
    sorting and combining are the parent's ``forward``.
    """

    grouped_gemm = False  # the loop calls our expert_weights / expert

    def __init__(
        self,
        experts: StackedExperts,
        blocksize: int = NF4_BLOCKSIZE,
        double_quant: bool = True,
        compute_dtype: Optional[torch.dtype] = None,
        backend: Backend = "auto",
    ) -> None:
        nn.Module.__init__(self)  # the parent's __init__ would allocate dense parameters
        resolve_backend(backend, torch.device("cpu"))
        self.n_experts, self.act, self.is_glu = experts.n_experts, experts.act, experts.is_glu
        self.proj_names = expert_proj_names(experts)
        for name in self.proj_names:
            setattr(self, name, NF4Weight.quantize(getattr(experts, name), blocksize, double_quant))
        self.compute_dtype = compute_dtype or experts.up_proj.dtype
        self.backend = backend

    def expert_weights(self) -> list[tuple[NF4Tensor, ...]]:
        """Per-expert ([gate,] up, down) as `NF4Tensor` s."""
        mats = [getattr(self, name) for name in self.proj_names]
        return [tuple(m[e] for m in mats) for e in range(self.n_experts)]

    def linear(self, x: torch.Tensor, q: NF4Tensor) -> torch.Tensor:
        return nf4_linear(x, q, None, self.compute_dtype, self.backend)

    def expert(self, weights: tuple[NF4Tensor, ...], x: torch.Tensor) -> torch.Tensor:
        return expert_forward(weights, x, self.act, self.is_glu, self.linear)


def expert_proj_names(experts: StackedExperts) -> tuple[str, ...]:
    return ("gate_proj", "up_proj", "down_proj") if experts.is_glu else ("up_proj", "down_proj")


# ---------------------------------------------------------------------------- whole models
def path_matches(path: str, entry: str) -> bool:
    """True when the dotted ``entry`` is a run of whole components of ``path`` ("lm_head", "layers.0")."""
    return f".{entry}." in f".{path}."


@torch.no_grad()
def quantize_model(
    model: nn.Module,
    skip: Sequence[str] = DEFAULT_SKIP,
    blocksize: int = NF4_BLOCKSIZE,
    double_quant: bool = True,
    compute_dtype: Optional[torch.dtype] = None,
    backend: Backend = "auto",
) -> nn.Module:
    """Replace, in place, every ``nn.Linear`` by an `NF4Linear` and every `StackedExperts` by
    `NF4Experts`, except modules whose path contains an entry of ``skip`` as whole components
    (default: the head and the embedding). Quantise before `model.lora.apply_lora`.

    ``compute_dtype`` defaults to each layer's current weight dtype. Returns ``model``.
    """
    from model.lora import LoraLinear, LoraExperts  # the LoRA wrappers live on top of this module

    targets = []
    for path, module in model.named_modules():
        if isinstance(module, (LoraLinear, LoraExperts)):
            raise ValueError("quantize_model must run before apply_lora (the model already has LoRA adapters)")
        if any(path_matches(path, s) for s in skip):
            continue
        if isinstance(module, nn.Linear) or (isinstance(module, StackedExperts) and not isinstance(module, NF4Experts)):
            targets.append((path, module))
    for path, module in targets:
        if isinstance(module, nn.Linear):
            new = NF4Linear.from_linear(module, blocksize, double_quant, compute_dtype, backend)
        else:
            new = NF4Experts(module, blocksize, double_quant, compute_dtype, backend)
        set_submodule(model, path, new)
    return model


def set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    """Put ``module`` at the dotted ``path`` of ``model``."""
    parent_path, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent_path) if parent_path else model, name, module)


def weight_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes of the stored weights: ``nf4`` (packed 4-bit weights and their scales), ``lora``
    (adapter parameters), ``other`` (every other parameter and persistent buffer) and ``total``.
    A tensor shared by two names counts once."""
    from model.lora import lora_parameters

    seen: set[int] = set()

    def size(tensors) -> int:
        total = 0
        for t in tensors:
            if t is not None and t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
        return total

    nf4 = size(b for m in model.modules() if isinstance(m, NF4Weight) for b in m.buffers())
    lora = size(lora_parameters(model))
    other = size(model.state_dict().values())
    return {"nf4": nf4, "lora": lora, "other": other, "total": nf4 + lora + other}
