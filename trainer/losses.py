"""Loss functions as pure functions, and the normalisation by the global target-token count.

A training stage hands the engine a loss function ``(model, batch) -> LossOutput`` that
returns the *sum* of its per-token losses and how many target tokens that sum covers; the
engine, not the loss, divides. As in torchtitan's ``components/loss.py``, the divisor is the
number of target tokens of the whole optimizer step: over every micro-batch of gradient
accumulation and every data-parallel rank. The engine counts the targets of the step's
micro-batches first (`count_targets`), all-reduces that count, and back-propagates each
micro-batch as `micro_batch_objective`. Summed over micro-batches (accumulation) and averaged
over ranks (DDP / FSDP gradient reduction), the gradient is then exactly that of the mean
loss over all target tokens of the step, whatever the padding or masking of each micro-batch
— unlike averaging per-micro-batch means, which over-weights short micro-batches.

Terms that are already means (the MoE sequence-wise balance loss, DeepSeek-V3 §2.1.2) travel
separately as `LossOutput.aux_loss` and are averaged over micro-batches and ranks.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from data_pipeline.loader import IGNORE_INDEX  # labels that take no part in the loss (-100)

Batch = dict[str, Tensor]


@dataclass
class LossOutput:
    """What a stage's loss function returns for one micro-batch."""

    loss_sum: Tensor                   # () sum of per-target losses (carries the graph)
    n_tokens: int                      # how many targets `loss_sum` sums over
    aux_loss: Optional[Tensor] = None  # () a term that is already a mean (MoE balance loss)
    sums: dict[str, Tensor] = field(default_factory=dict)  # extra per-target sums to log, e.g. "ce"


LossFn = Callable[[Any, Batch], LossOutput]


def cross_entropy_sum(logits: Tensor, targets: Tensor, ignore_index: int = IGNORE_INDEX) -> tuple[Tensor, int]:
    """Summed next-token cross-entropy over the targets that are not `ignore_index`.

    logits (..., V), targets (...) → (sum of -log p(target), number of targets counted).
    Computed in fp32 (autocast runs cross_entropy in fp32 too).
    """
    flat_logits = logits.reshape(-1, logits.shape[-1])  # (N, V)
    flat_targets = targets.reshape(-1)  # (N,)
    if flat_logits.dtype != torch.float32 and not torch.is_autocast_enabled(flat_logits.device.type):
        flat_logits = flat_logits.float()
    loss_sum = F.cross_entropy(flat_logits, flat_targets, ignore_index=ignore_index, reduction="sum")
    return loss_sum, int((flat_targets != ignore_index).sum())


def count_targets(batch: Batch, key: str = "labels", ignore_index: int = IGNORE_INDEX) -> int:
    """Target tokens of a batch: the labels that are not `ignore_index`."""
    return int((batch[key] != ignore_index).sum())


def batch_tokens(batch: Batch) -> int:
    """Input tokens of a batch (every ``*input_ids`` tensor, padding included), for throughput."""
    return sum(int(v.numel()) for k, v in batch.items() if k.endswith("input_ids"))


def micro_batch_objective(out: LossOutput, global_tokens: int, world_size: int, grad_accum: int) -> Tensor:
    """The scalar to back-propagate for one micro-batch.

    ``loss_sum * world_size / global_tokens + aux_loss / grad_accum``: the `world_size`
    factor undoes the gradient *averaging* of DDP / FSDP, so the step's gradient is that of
    ``Σ loss_sum / global_tokens`` (+ the mean of the aux terms) over every micro-batch and rank.
    """
    loss = out.loss_sum * (world_size / max(global_tokens, 1))
    if out.aux_loss is not None:
        loss = loss + out.aux_loss / grad_accum
    return loss


def mtp_loss_sum(mtp_logits: list[Tensor], labels: Tensor, weight: float) -> tuple[Tensor, Tensor]:
    """DeepSeek-V3 multi-token prediction loss (§2.2, eq. 25) as a sum: ``weight / D · Σ_k CE_k``.

    ``mtp_logits[k-1]`` (B, T-k, V) predicts ``labels[:, k:]`` (depth k). Returns
    (weighted sum to add to the main loss sum, unweighted mean-over-depths sum to log). Like the
    main loss it is divided by the step's main target count, which over-counts depth k's
    targets by about k/T per row (the last k positions have no target at depth k).
    """
    depth_sums = [cross_entropy_sum(logits, labels[:, k:])[0] for k, logits in enumerate(mtp_logits, start=1)]
    mean_sum = torch.stack(depth_sums).mean()
    return weight * mean_sum, mean_sum.detach()


def causal_lm_loss(model: torch.nn.Module, batch: Batch) -> LossOutput:
    """Next-token loss of a decoder LM on a batch ``input_ids (B, T), labels (B, T)``.

    Optional batch keys, passed to the model: ``position_ids`` and ``doc_ids`` (document
    masking of packed rows). Models with multi-token prediction (``cfg.mtp_depth > 0``) add
    ``mtp_loss_weight`` × the MTP loss; MoE models add their balance loss (``model.aux_loss()``).
    """
    from trainer.distributed import unwrap

    base = unwrap(model)
    positions, doc_ids = batch.get("position_ids"), batch.get("doc_ids")
    capture = _hidden_capture(base) if _mtp_depth(base) > 0 else None
    logits = model(batch["input_ids"], positions=positions, doc_ids=doc_ids)  # (B, T, V)
    ce_sum, n = cross_entropy_sum(logits, batch["labels"])
    out = LossOutput(loss_sum=ce_sum, n_tokens=n, sums={"ce": ce_sum.detach()})
    if capture is not None:
        hidden, capture.hidden = capture.hidden, None  # (B, T, D)
        mtp = base.mtp_logits(hidden, batch["input_ids"], positions=positions, doc_ids=doc_ids)
        weighted, logged = mtp_loss_sum(mtp, batch["labels"], base.cfg.mtp_loss_weight)
        out.loss_sum = out.loss_sum + weighted
        out.sums["mtp"] = logged
    out.aux_loss = model_aux_loss(base)
    return out


def model_aux_loss(model: torch.nn.Module) -> Optional[Tensor]:
    """The model's auxiliary loss of its last forward (MoE balance loss), if any."""
    from trainer.distributed import unwrap

    aux = getattr(unwrap(model), "aux_loss", None)
    value = aux() if callable(aux) else None
    if isinstance(value, Tensor) and value.requires_grad:
        return value
    return None


def _mtp_depth(model: torch.nn.Module) -> int:
    cfg = getattr(model, "cfg", None)
    return getattr(cfg, "mtp_depth", 0) or 0


class _HiddenCapture:
    """Forward hook on the final norm that keeps its input: the last hidden states (B, T, D),
    which the MTP modules continue from. A hook (rather than calling ``forward_hidden``) keeps
    the forward going through the DDP / FSDP / compile wrappers' ``__call__``."""

    def __init__(self) -> None:
        self.hidden: Optional[Tensor] = None

    def __call__(self, module: torch.nn.Module, args: tuple, output: Tensor) -> None:
        self.hidden = args[0]


def _hidden_capture(base: torch.nn.Module) -> _HiddenCapture:
    """The model's capture hook, registered once (a stable hook keeps torch.compile's guards)."""
    capture = getattr(base, "_hidden_capture", None)
    if capture is None:
        capture = _HiddenCapture()
        base.norm.register_forward_hook(capture)
        base._hidden_capture = capture
    return capture
