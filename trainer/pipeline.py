"""Pipeline parallelism: the model's blocks split into stages on ``pipeline_parallel`` ranks,
run with PyTorch's own `torch.distributed.pipelining` (`PipelineStage` + a schedule).

- GPipe (Huang et al. 2019): all micro-batches forward, then all backward.
- 1F1B (PipeDream-Flush, Narayanan et al. 2021): after a warm-up, one forward then one
  backward, so at most `stages` micro-batches of activations are alive.
- Interleaved 1F1B (Narayanan et al. 2021, "Efficient Large-Scale Language Model Training on
  GPU Clusters"): two smaller stages per rank (stage s on rank s mod pp), a smaller bubble.

The micro-batches are the engine's gradient-accumulation micro-batches: one optimizer step
concatenates ``grad_accum_steps`` loader batches and the schedule cuts them apart again. The
loss is the causal-LM cross-entropy on ``labels`` (what pretraining and SFT compute; the last
stage computes it, so the stage's own loss function is not called): a micro-batch's summed
cross-entropy divided by the step's global target count (`trainer.losses`), so the gradients
are those of one process over the same step (``scale_grads=False``: the schedule must not
divide again). Forward and backward interleave inside the schedule, so under bf16 autocast
covers both. Data-parallel replicas of a stage
sum their gradients with one all-reduce per parameter; the gradient norm for clipping is
summed over the stages.

Every rank builds the whole model (same seed, so the same weights) and keeps its stages'
parts (`StageModel`), whose parameter names are the whole model's: the optimizer state and
checkpoints are keyed like a single process's, and `gather_full_state` merges the stages
into the existing checkpoint format.
"""
from __future__ import annotations

import math
from typing import Any, Callable, ContextManager, Iterable, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B

from model.positions import positions_from_doc_ids
from model.transformer import Transformer
from data_pipeline.loader import IGNORE_INDEX
from trainer.distributed import DistInfo, all_reduce_sum
from trainer.evaluation import to_device
from trainer.losses import Batch, batch_tokens, cross_entropy_sum
from utils.config import TrainingConfig, stage_layer_counts
from utils.errors import UserError


class StageModel(nn.Module):
    """The embedding (first stage), some blocks, and the final norm + head (last stage) of a
    `Transformer`, sharing its modules and parameter names (``layers.<i>...``).

    forward: tokens (B, T) on the first stage, else hidden (B, T, D); positions (B, T), doc_ids
    (B, T) or None -> hidden (B, T, D), or logits (B, T, V) on the last stage.
    """

    # the same pieces as the whole model (they read only the attributes set in __init__)
    embed_tokens = Transformer.embed_tokens
    rope_tables = Transformer.rope_tables
    head = Transformer.head

    def __init__(self, model: Transformer, layers: list[int], first: bool, last: bool) -> None:
        super().__init__()
        self.cfg = model.cfg
        self.embed = model.embed if first else None
        self.layers = nn.ModuleDict({str(i): model.layers[i] for i in layers})
        self.norm = model.norm if last else None
        self.lm_head = model.lm_head if last else None
        self.rope, self.rope_local, self.embed_scale = model.rope, model.rope_local, model.embed_scale

    def forward(self, x: Tensor, positions: Tensor, doc_ids: Optional[Tensor] = None) -> Tensor:
        h = self.embed_tokens(x) if self.embed is not None else x  # (B, T, D)
        tables = self.rope_tables(positions, h.dtype)
        for layer in self.layers.values():
            h = layer(h, tables[layer.layer_type], positions, None, doc_ids)
        return self.head(self.norm(h)) if self.norm is not None else h


def check_supported(model: nn.Module, tcfg: TrainingConfig) -> None:
    """Refuse (one line) what the pipeline does not run exactly."""
    cfg = getattr(model, "cfg", None)
    if not isinstance(model, Transformer):
        raise UserError("training.pipeline_parallel needs a model of this toolkit (model.Transformer)")
    problems = {
        "model.tie_embeddings (the embedding and head live on different stages)": cfg.tie_embeddings,
        "model.mtp_depth > 0": cfg.mtp_depth > 0,
        "model.moe.seq_aux_loss_alpha > 0": cfg.moe is not None and cfg.moe.seq_aux_loss_alpha > 0,
        "training.parallelism=fsdp (data parallel replicas use all-reduce)": tcfg.parallelism == "fsdp",
        "training.compile": tcfg.compile,
        "training.dtype=fp16 (loss scaling)": tcfg.dtype == "fp16",
    }
    bad = [name for name, hit in problems.items() if hit]
    if bad:
        raise UserError(f"training.pipeline_parallel > 1 does not support {', '.join(bad)}")


def rank_stages(tcfg: TrainingConfig, pp_rank: int) -> list[int]:
    """The stages a rank runs: its own, or (interleaved) stages pp_rank, pp_rank + pp, ..."""
    return list(range(pp_rank, tcfg.pipeline_stages(), tcfg.pipeline_parallel))


class Pipeline:
    """This rank's stages and schedules; `step` runs one optimizer step's forward + backward."""

    def __init__(self, model: Transformer, tcfg: TrainingConfig, info: DistInfo) -> None:
        check_supported(model, tcfg)
        pp_rank, pp_group, dp_group = info.pp_rank, info.group("pp"), info.group("dp")
        try:
            counts = stage_layer_counts(model.cfg.n_layers, tcfg)
        except ValueError as e:
            raise UserError(str(e)) from None
        starts = [sum(counts[:s]) for s in range(len(counts))]
        n_stages = len(counts)
        mine = rank_stages(tcfg, pp_rank)
        self.parts = [StageModel(model, list(range(starts[s], starts[s] + counts[s])), s == 0, s == n_stages - 1)
                      for s in mine]
        owned = [i for s in mine for i in range(starts[s], starts[s] + counts[s])]
        # everything this rank trains, under the whole model's names (optimizer, checkpoints)
        self.module = StageModel(model, owned, 0 in mine, n_stages - 1 in mine)
        self.is_first, self.is_last = 0 in mine, n_stages - 1 in mine
        self.pp_group, self.dp_group = pp_group, dp_group
        self.scale = 1.0  # 1 / the step's global target count, set by `step`
        stages = [PipelineStage(part, s, n_stages, info.device, group=pp_group) for part, s in zip(self.parts, mine)]
        accum = tcfg.grad_accum_steps
        common = dict(loss_fn=self._loss, scale_grads=False)
        if tcfg.pipeline_schedule == "interleaved_1f1b":
            self.schedule = ScheduleInterleaved1F1B(stages, accum, **common)
        else:
            cls = ScheduleGPipe if tcfg.pipeline_schedule == "gpipe" else Schedule1F1B
            self.schedule = cls(stages[0], accum, **common)
        self.accum = accum

    def _loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        """A micro-batch's objective: its summed cross-entropy over the step's target count."""
        return cross_entropy_sum(logits, labels)[0] * self.scale

    def _run(self, batch: Batch, train: bool) -> float:
        """Run the schedule on a whole batch (forward + backward, or forward only); returns the
        summed cross-entropy (last stage, else 0)."""
        tokens = batch["input_ids"]  # (B, T)
        doc_ids = batch.get("doc_ids")
        positions = batch.get("position_ids")
        if positions is None:
            positions = (positions_from_doc_ids(doc_ids) if doc_ids is not None
                         else torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens))
        kwargs = {"positions": positions, **({"doc_ids": doc_ids} if doc_ids is not None else {})}
        args = (tokens,) if self.is_first else ()
        target = batch["labels"] if self.is_last else None
        losses: list[Tensor] = []
        run = self.schedule.step if train else self.schedule.eval
        run(*args, target=target, losses=losses if self.is_last else None, return_outputs=False, **kwargs)
        return float(sum(loss.detach().double() for loss in losses) / self.scale) if losses else 0.0

    def step(self, micro: list[Batch], global_targets: int) -> float:
        """Forward + backward of one optimizer step's micro-batches (on this rank's stages);
        gradients summed over data-parallel replicas. Returns this rank's summed cross-entropy."""
        self.scale = 1.0 / max(global_targets, 1)
        loss_sum = self._run(concat_batches(micro), train=True)
        if self.dp_group is not None and dist.get_world_size(self.dp_group) > 1:
            for p in self.module.parameters():
                if p.grad is not None:
                    dist.all_reduce(p.grad, group=self.dp_group)
        return loss_sum

    def forward_backward(self, micro: list[Batch], count_fn: Callable[[Batch], int], dp_size: int) -> dict[str, Any]:
        """The engine's step statistics (`Trainer._forward_backward`) of one pipelined step: the
        target count summed over data-parallel replicas (every stage counts the same batches),
        the loss over the last stages of all replicas."""
        device = micro[0]["input_ids"].device
        targets = int(all_reduce_sum(torch.tensor([sum(count_fn(b) for b in micro)], device=device),
                                     self.dp_group).item())
        loss_sum = all_reduce_sum(torch.tensor([self.step(micro, targets)], dtype=torch.float64, device=device))
        loss = loss_sum.item() / max(targets, 1)
        tokens = sum(batch_tokens(b) for b in micro) * dp_size
        return {"loss": loss, "sums": {"ce": loss}, "tokens": tokens}

    @torch.no_grad()
    def evaluate(self, batches: Iterable[Batch], num_batches: int, device: torch.device,
                 amp: Callable[[], ContextManager]) -> dict[str, float]:
        """Validation loss / perplexity over `num_batches` batches per replica, like
        `trainer.evaluation.evaluate`: forward only, through the training schedule (its
        `eval`), `grad_accum_steps` batches at a time as its micro-batches (a second schedule
        over the same stages would re-plan their buffers under the first one)."""
        self.module.eval()
        self.scale = 1.0
        totals = torch.zeros(2, dtype=torch.float64, device=device)  # (summed cross-entropy, targets)
        taken = [to_device(batch, device) for _, batch in zip(range(num_batches), batches)]
        for i in range(0, len(taken), self.accum):
            group = concat_batches(taken[i:i + self.accum])
            with amp():
                totals[0] += self._run(group, train=False)
            totals[1] += int((group["labels"] != IGNORE_INDEX).sum()) if self.is_last else 0
        all_reduce_sum(totals)
        self.module.train()
        loss = (totals[0] / totals[1].clamp(min=1)).item()
        return {"val_loss": loss, "val_tokens": int(totals[1].item()), "val_ppl": math.exp(min(loss, 50.0))}

    def clip_grad_norm(self, max_norm: float) -> Tensor:
        """Clip by the gradient norm over every stage (each rank's squares summed over the pipeline)."""
        grads = [p.grad for p in self.module.parameters() if p.grad is not None]
        device = next(self.module.parameters()).device
        square = torch.zeros((), dtype=torch.float32, device=device)
        for g in grads:
            square += g.detach().float().pow(2).sum()
        dist.all_reduce(square, group=self.pp_group)
        norm = square.sqrt()
        torch.nn.utils.clip_grads_with_norm_(grads, max_norm, norm)
        return norm


def concat_batches(micro: list[Batch]) -> Batch:
    """The step's micro-batches as one batch (the schedule splits it again along dim 0)."""
    shapes = {tuple(m["input_ids"].shape) for m in micro}
    if len(shapes) > 1:
        raise UserError(f"training.pipeline_parallel needs micro-batches of one shape, got {sorted(shapes)}")
    return {k: torch.cat([m[k] for m in micro]) for k, v in micro[0].items() if isinstance(v, Tensor)}


def _gather_to_first(obj: Any, group: dist.ProcessGroup) -> Optional[list[Any]]:
    """Every pipeline rank's `obj` on the group's first rank (the stages' owner of rank 0);
    None on the others."""
    first = dist.get_rank(group) == 0
    parts: Optional[list[Any]] = [None] * dist.get_world_size(group) if first else None
    dist.gather_object(obj, parts, dst=dist.get_global_rank(group, 0), group=group)
    return parts


def gather_full_state(state: dict[str, Tensor], group: dist.ProcessGroup) -> dict[str, Tensor]:
    """Every stage's (CPU) state dict merged into the whole model's on the pipeline group's
    first rank (empty elsewhere, like FSDP2's full state dict): the existing checkpoint format,
    loadable by a single process unchanged. Call on every rank of the pipeline group."""
    parts = _gather_to_first(state, group)
    return {} if parts is None else {k: v for part in parts for k, v in part.items()}


def gather_full_optimizer_state(module: nn.Module, optimizer: torch.optim.Optimizer, group: dist.ProcessGroup,
                                layout: list[list[str]]) -> dict:
    """Every stage's optimizer state, keyed by parameter name, merged into the whole model's:
    ``state`` united, param groups as `layout` (the parameter names of each group of the
    optimizer built over the whole model, `optimizer_layout`). The format of
    `trainer.distributed.full_optimizer_state_dict`, on the group's first rank (empty elsewhere)."""
    state = get_optimizer_state_dict(module, optimizer, options=StateDictOptions(full_state_dict=True))
    state["state"] = {name: {k: v.detach().cpu() if isinstance(v, Tensor) else v for k, v in st.items()}
                      for name, st in state["state"].items()}
    parts = _gather_to_first(state, group)
    if parts is None:
        return {}
    hyper = {n: g for part in parts for g in part["param_groups"] for n in g["params"]}
    return {"state": {k: v for part in parts for k, v in part["state"].items()},
            "param_groups": [{**hyper[names[0]], "params": list(names)} for names in layout]}


def optimizer_layout(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[list[str]]:
    """The parameter names of each param group of `optimizer` (built over `model`)."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [[names[id(p)] for p in g["params"]] for g in optimizer.param_groups]


def split_optimizer_state(state: dict, names: set[str]) -> dict:
    """The part of a whole-model optimizer state that concerns the parameters `names`."""
    groups = [{**g, "params": [n for n in g["params"] if n in names]} for g in state["param_groups"]]
    return {"state": {k: v for k, v in state["state"].items() if k in names}, "param_groups": groups}
