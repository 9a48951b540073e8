"""Optimizers: AdamW and Muon, built from a `TrainingConfig`.

AdamW (Loshchilov & Hutter 2019) with decoupled weight decay. Which parameters decay follows
nanoGPT: every parameter with two or more dimensions decays (attention/FFN matrices, stacked
MoE experts, the token embedding and the output head); one-dimensional parameters (norm
weights, biases) never do, since shrinking a gain or an offset towards zero has no
regularising meaning.

Muon (Jordan et al. 2024, "Muon: an optimizer for hidden layers"; modded-nanogpt; Liu et al.
2025, "Muon is Scalable for LLM Training"): SGD momentum with Nesterov look-ahead whose update
matrix is replaced by its nearest semi-orthogonal matrix, computed with a quintic
Newton–Schulz iteration (`newton_schulz`). It is used for the hidden weight matrices only
(attention and FFN projections, the MoE router, stacked 3-D experts treated as a batch of
matrices); the token embedding, the output head, norms and biases keep AdamW, as in the
paper. Both live in ONE optimizer, `Muon`, whose param groups carry a ``use_muon`` flag, so
`state_dict()` / `load_state_dict()` and `torch.distributed.checkpoint` see a single ordinary
`torch.optim.Optimizer`.

Update scale: the orthogonalised update is multiplied by ``max(1, rows / cols) ** 0.5``
(Keller Jordan's rule, `adjust_lr_fn="original"` in `torch.optim.Muon`), which is why Muon
has its own learning rate (`TrainingConfig.muon_learning_rate`, 0.02 as in modded-nanogpt)
instead of reusing AdamW's (Moonlight's alternative 0.2·sqrt(max(rows, cols)) rule matches
AdamW's update RMS; it is not used here). Weight decay is decoupled:
``p ← p·(1 − lr·wd) − lr·scale·O``.

Every param group stores ``base_lr``; the training loop sets ``lr = base_lr × multiplier``
each step with `set_lr` (see `trainer.schedule.lr_multiplier`).
"""
from __future__ import annotations

import math
from typing import Iterable, Optional

import torch
import torch.nn as nn
from torch import Tensor
from torch.distributed.tensor import DTensor, distribute_tensor

from trainer.distributed import unwrap
from utils.config import TrainingConfig

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # quintic, tuned for maximal slope at zero (Jordan 2024)
NS_STEPS = 5


# ---------------------------------------------------------------- the math
def newton_schulz(G: Tensor, steps: int = NS_STEPS, dtype: Optional[torch.dtype] = None, eps: float = 1e-7) -> Tensor:
    """Approximately orthogonalise `G` (…, rows, cols): U S Vᵀ → U S' Vᵀ with S' ≈ 1.

    Each step applies the odd quintic p(x) = a·x + b·x³ + c·x⁵ to the singular values:
    X ← a·X + (b·A + c·A²)·X with A = X·Xᵀ. The input is first divided by its Frobenius norm
    so every singular value lies in [0, 1]. The coefficients trade exact convergence for speed:
    after 5 steps singular values of well-conditioned inputs land in roughly [0.68, 1.13]
    rather than at exactly 1, which does not hurt training (Jordan 2024).

    Tall matrices are transposed so the Gram matrix A is the small (min × min) one. Leading
    dimensions are a batch (stacked MoE experts). Runs in bf16 on GPU and fp32 elsewhere unless
    `dtype` is given; returns `G.dtype`.
    """
    if G.ndim < 2:
        raise ValueError(f"newton_schulz needs a matrix or a batch of matrices, got shape {tuple(G.shape)}")
    a, b, c = NS_COEFFICIENTS
    if dtype is None:
        dtype = torch.bfloat16 if G.is_cuda else torch.float32
    X = G.to(dtype)
    tall = G.size(-2) > G.size(-1)
    if tall:
        X = X.mT  # (…, cols, rows): wide
    X = X / X.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)  # spectral norm ≤ Frobenius norm = 1
    for _ in range(steps):
        A = X @ X.mT  # (…, m, m), m = min(rows, cols)
        B = b * A + c * (A @ A)
        X = a * X + B @ X
    if tall:
        X = X.mT
    return X.to(G.dtype)


def muon_scale(shape: torch.Size) -> float:
    """Keller Jordan's update scale max(1, rows/cols)^0.5 (rows, cols = the last two dims)."""
    rows, cols = shape[-2], shape[-1]
    return math.sqrt(max(1.0, rows / cols))


def _orthogonalize(update: Tensor, steps: int) -> Tensor:
    """`newton_schulz` that also handles FSDP2's sharded DTensors.

    A shard of a matrix is not a matrix we can orthogonalise, so the full update is gathered,
    orthogonalised (identically on every rank) and each rank keeps its own shard again.
    """
    if isinstance(update, DTensor):
        full = newton_schulz(update.full_tensor(), steps)
        return distribute_tensor(full, update.device_mesh, update.placements, src_data_rank=None)
    return newton_schulz(update, steps)


# ---------------------------------------------------------------- the optimizer
class Muon(torch.optim.Optimizer):
    """Muon for groups with ``use_muon=True``, AdamW for the others — one optimizer.

    Muon groups need ``lr, weight_decay, momentum, nesterov, ns_steps``; AdamW groups need
    ``lr, weight_decay, betas, eps``. State: ``momentum_buffer`` (Muon) or
    ``step, exp_avg, exp_avg_sq`` (AdamW, same names and maths as `torch.optim.AdamW`).
    """

    _MUON_KEYS = ("lr", "weight_decay", "momentum", "nesterov", "ns_steps")
    _ADAMW_KEYS = ("lr", "weight_decay", "betas", "eps")

    def __init__(self, param_groups: list[dict]):
        for g in param_groups:
            if "use_muon" not in g:
                raise ValueError("every Muon param group needs a `use_muon` flag")
            missing = [k for k in (self._MUON_KEYS if g["use_muon"] else self._ADAMW_KEYS) if k not in g]
            if missing:
                raise ValueError(f"Muon param group (use_muon={g['use_muon']}) is missing {missing}")
            if g["use_muon"]:
                bad = [tuple(p.shape) for p in g["params"] if p.ndim < 2]
                if bad:
                    raise ValueError(f"Muon groups take matrices (or batches of them) only, got shapes {bad}")
        super().__init__(param_groups, defaults={})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["use_muon"]:
                self._muon_step(group)
            else:
                self._adamw_step(group)
        return loss

    def _muon_step(self, group: dict) -> None:
        lr, wd, momentum = group["lr"], group["weight_decay"], group["momentum"]
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p.grad)
            buf = state["momentum_buffer"]
            buf.lerp_(p.grad, 1 - momentum)  # buf = m·buf + (1−m)·g
            update = p.grad.lerp(buf, momentum) if group["nesterov"] else buf  # Nesterov look-ahead
            update = _orthogonalize(update, group["ns_steps"])
            p.mul_(1 - lr * wd)  # decoupled weight decay
            p.add_(update, alpha=-lr * muon_scale(p.shape))

    def _adamw_step(self, group: dict) -> None:
        lr, wd, (beta1, beta2), eps = group["lr"], group["weight_decay"], group["betas"], group["eps"]
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
            state["step"] += 1
            m, v, t = state["exp_avg"], state["exp_avg_sq"], state["step"]
            m.lerp_(p.grad, 1 - beta1)  # first moment
            v.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)  # second moment
            bias1, bias2 = 1 - beta1**t, 1 - beta2**t
            p.mul_(1 - lr * wd)
            denom = (v.sqrt() / math.sqrt(bias2)).add_(eps)
            p.addcdiv_(m, denom, value=-lr / bias1)


# ---------------------------------------------------------------- building from a config
def classify_params(
    model: nn.Module, trainable: Optional[Iterable[nn.Parameter]] = None
) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """Split the trainable parameters into ``hidden`` (≥2-D hidden matrices: Muon's),
    ``embed_head`` (token embeddings and output heads: ≥2-D but AdamW) and ``no_decay``
    (1-D: norms, biases). Returns ``{group: [(name, param), ...]}`` in model order.

    `trainable` restricts the set (e.g. LoRA adapters); by default every parameter with
    ``requires_grad``. Embeddings are found by module type (`nn.Embedding`), heads by the
    module name ``lm_head`` (the model's naming contract).
    """
    base = unwrap(model)
    keep = None if trainable is None else {id(p) for p in trainable}
    io_ids: set[int] = set()
    for name, module in base.named_modules():
        if isinstance(module, nn.Embedding) or name.split(".")[-1] == "lm_head":
            io_ids.update(id(p) for p in module.parameters(recurse=False))
    groups: dict[str, list[tuple[str, nn.Parameter]]] = {"hidden": [], "embed_head": [], "no_decay": []}
    for name, p in base.named_parameters():
        if (keep is not None and id(p) not in keep) or (keep is None and not p.requires_grad):
            continue
        if p.ndim < 2:
            groups["no_decay"].append((name, p))
        elif id(p) in io_ids:
            groups["embed_head"].append((name, p))
        else:
            groups["hidden"].append((name, p))
    if keep is not None:
        found = sum(len(v) for v in groups.values())
        if found != len(keep):
            raise ValueError(f"{len(keep) - found} of the given trainable parameters are not parameters of the model")
    return groups


def build_optimizer(
    model: nn.Module, tcfg: TrainingConfig, trainable: Optional[Iterable[nn.Parameter]] = None
) -> torch.optim.Optimizer:
    """AdamW or Muon(+AdamW) over the model's trainable parameters, per `tcfg.optimizer`.

    Call it after `trainer.distributed.wrap_model` (FSDP2 replaces parameters by DTensors).
    Every group carries ``base_lr``; `lr` starts at ``base_lr`` until `set_lr` is called.
    """
    parts = {k: [p for _, p in named] for k, named in classify_params(model, trainable).items()}
    if not any(parts.values()):
        raise ValueError("no trainable parameters to optimise")
    wd, adam_lr = tcfg.weight_decay, tcfg.learning_rate
    adamw = dict(betas=(tcfg.beta1, tcfg.beta2), eps=tcfg.eps)

    def group(params: list[nn.Parameter], lr: float, weight_decay: float, **extra) -> list[dict]:
        return [dict(params=params, lr=lr, base_lr=lr, weight_decay=weight_decay, **extra)] if params else []

    if tcfg.optimizer == "adamw":
        groups = group(parts["hidden"] + parts["embed_head"], adam_lr, wd) + group(parts["no_decay"], adam_lr, 0.0)
        # fused: one kernel over all tensors, on CUDA and on CPU alike (CPU: ~5x faster than foreach)
        fused = all(p.device.type in ("cpu", "cuda") for g in groups for p in g["params"])
        return torch.optim.AdamW(groups, lr=adam_lr, **adamw, fused=fused, foreach=not fused)
    muon = dict(use_muon=True, momentum=tcfg.muon_momentum, nesterov=True, ns_steps=NS_STEPS)
    return Muon(
        group(parts["hidden"], tcfg.muon_learning_rate, wd, **muon)
        + group(parts["embed_head"], adam_lr, wd, use_muon=False, **adamw)
        + group(parts["no_decay"], adam_lr, 0.0, use_muon=False, **adamw)
    )


def set_lr(optimizer: torch.optim.Optimizer, multiplier: float) -> None:
    """lr = base_lr × multiplier for every param group."""
    for g in optimizer.param_groups:
        g["lr"] = g["base_lr"] * multiplier
