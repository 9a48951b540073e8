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

Terms over targets of their own (the multi-token prediction depths, DeepSeek-V3 §2.2) travel
as `LossOutput.terms`: each is divided by the step's global count of *its* targets, which
`term_counts` reads off the batch before the forward like `count_targets`. Terms that are
already means (the MoE sequence-wise balance loss, DeepSeek-V3 §2.1.2) travel separately as
`LossOutput.aux_loss` and are averaged over micro-batches and ranks.
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
    # objective terms over targets of their own, by name: each is divided by the step's count of
    # its targets (`term_counts`); a logged sum of the same name is a mean over them too
    terms: dict[str, Tensor] = field(default_factory=dict)
    term_counts: dict[str, int] = field(default_factory=dict)  # this micro-batch's targets of each term


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


def micro_batch_objective(out: LossOutput, global_tokens: int, world_size: int, grad_accum: int,
                          global_counts: Optional[dict[str, int]] = None) -> Tensor:
    """The scalar to back-propagate for one micro-batch.

    ``loss_sum * world_size / global_tokens + Σ terms[name] * world_size / global_counts[name]
    + aux_loss / grad_accum``: the `world_size` factor undoes the gradient *averaging* of DDP /
    FSDP, so the step's gradient is that of ``Σ loss_sum / global_tokens`` plus each term's mean
    over its own targets (+ the mean of the aux terms) over every micro-batch and rank.
    """
    loss = out.loss_sum * (world_size / max(global_tokens, 1))
    for name, term in out.terms.items():
        if global_counts is None or name not in global_counts:
            raise RuntimeError(f"loss term {name!r} has no step count: trainer.losses.term_counts must count it")
        loss = loss + term * (world_size / max(global_counts[name], 1))
    if out.aux_loss is not None:
        loss = loss + out.aux_loss / grad_accum
    return loss


def mtp_targets(labels: Tensor, doc_ids: Optional[Tensor], k: int) -> Tensor:
    """Depth-k multi-token-prediction targets (B, T-k), lined up with ``mtp_logits[k-1]``.

    Position i's depth-k target is ``labels[:, i+k]`` (token t_{i+k+1}), the main target of
    position i+k. In packed rows (`doc_ids` (B, T)) it is dropped (-100) where position i+k lies
    in another document than i: the chain from h_i through the embeddings of t_{i+1..i+k}
    would read across the boundary. This is Megatron-LM's MTP on packed sequences (labels rolled
    within each sequence, the rolled-in ends masked); what a document's last position predicts
    follows the main labels.
    """
    targets = labels[:, k:]  # (B, T-k)
    if doc_ids is None:
        return targets
    crosses = doc_ids[:, k:] != doc_ids[:, :-k]  # (B, T-k)
    return targets.masked_fill(crosses, IGNORE_INDEX)


def mtp_depth_losses(mtp_logits: list[Tensor], labels: Tensor,
                     doc_ids: Optional[Tensor] = None) -> list[tuple[Tensor, int]]:
    """(summed cross-entropy, target count) of each MTP depth k = 1..D (`mtp_targets`)."""
    return [cross_entropy_sum(logits, mtp_targets(labels, doc_ids, k)) for k, logits in enumerate(mtp_logits, start=1)]


def term_counts(model: torch.nn.Module, batch: Batch) -> dict[str, int]:
    """Targets of the objective terms `causal_lm_loss` adds for `model` on `batch`, known
    before the forward: ``mtp/k`` for each multi-token prediction depth (none without MTP)."""
    from trainer.distributed import unwrap

    depth = _mtp_depth(unwrap(model))
    if depth == 0 or "labels" not in batch:
        return {}
    return {f"mtp/{k}": count_targets({"labels": mtp_targets(batch["labels"], batch.get("doc_ids"), k)})
            for k in range(1, depth + 1)}


def step_counts(model: torch.nn.Module, micro: list[Batch], count_fn: Callable[[Batch], int]) -> dict[str, int]:
    """This process's normalisers of one optimizer step: ``targets`` (`count_fn`, the main
    loss) and every objective term's own targets (`term_counts`), summed over micro-batches."""
    counts = {"targets": sum(count_fn(b) for b in micro)}
    for b in micro:
        for name, n in term_counts(model, b).items():
            counts[name] = counts.get(name, 0) + n
    return counts


def step_means(sums: dict[str, float], counts: dict[str, int]) -> dict[str, float]:
    """Per-target means of a step's reduced sums: a name with a count of its own (``mtp/k``)
    is divided by it, every other by the main ``targets`` count."""
    return {k: v / max(counts.get(k, counts["targets"]), 1) for k, v in sums.items()}


def causal_lm_loss(model: torch.nn.Module, batch: Batch) -> LossOutput:
    """Next-token loss of a decoder LM on a batch ``input_ids (B, T), labels (B, T)``.

    Optional batch keys, passed to the model: ``position_ids`` and ``doc_ids`` (document
    masking of packed rows). Models with multi-token prediction (``cfg.mtp_depth > 0``) add
    DeepSeek-V3's MTP loss (§2.2, eq. 25) ``λ / D · Σ_k L_k``, λ = ``mtp_loss_weight``, as terms
    ``mtp/k``: L_k is the mean cross-entropy over depth k's own targets (`mtp_targets`, never
    across a document boundary); the per-depth means are logged as ``mtp/k``. MoE models add
    their balance loss (``model.aux_loss()``).
    """
    from trainer.distributed import unwrap

    base = unwrap(model)
    positions, doc_ids = batch.get("position_ids"), batch.get("doc_ids")
    capture = _hidden_capture(base) if _mtp_depth(base) > 0 else None
    labels = batch["labels"]
    fused = hasattr(base, "head_cross_entropy")  # our Transformer: the loss without (B, T, V) logits
    if fused:
        ce_sum = model(batch["input_ids"], positions=positions, doc_ids=doc_ids, labels=labels)  # ()
        n = count_targets(batch)
    else:
        logits = model(batch["input_ids"], positions=positions, doc_ids=doc_ids)  # (B, T, V)
        ce_sum, n = cross_entropy_sum(logits, labels)
    out = LossOutput(loss_sum=ce_sum, n_tokens=n, sums={"ce": ce_sum.detach()})
    if capture is not None:
        hidden, capture.hidden = capture.hidden, None  # (B, T, D)
        weight = base.cfg.mtp_loss_weight / _mtp_depth(base)
        for k, h_k in enumerate(base.mtp_hidden(hidden, batch["input_ids"], positions=positions, doc_ids=doc_ids), 1):
            targets = mtp_targets(labels, doc_ids, k)  # (B, T - k)
            ce_k = base.head_cross_entropy(h_k, targets)
            out.terms[f"mtp/{k}"] = weight * ce_k
            out.sums[f"mtp/{k}"] = ce_k.detach()
            out.term_counts[f"mtp/{k}"] = count_targets({"labels": targets})
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
