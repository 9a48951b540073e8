"""The one training loop every stage uses (structure after torchtitan's ``Trainer``, the loop
itself as plain as nanoGPT's ``train.py``).

A stage is *data + a loss function + which parameters train*, never a copy of this loop:

    trainer = Trainer(cfg, model, causal_lm_loss, train_loader, run, dist, stage="pretrain",
                      val_data=lambda: val_loader, trainable=None)
    trainer.resume("auto")    # optional
    trainer.fit()

One optimizer step: draw `grad_accum_steps` micro-batches, count their targets (and each
objective term's own, e.g. the MTP depths') and all-reduce the counts, then forward/backward
each micro-batch with its share of the mean loss over all targets of the step
(`trainer.losses.micro_batch_objective`; gradient sync only on the last micro-batch),
unscale (fp16), clip, let the spike guard judge the step, and either update (optimizer, MoE
balancing biases) or skip / roll back. Then log, evaluate, sample and save on their intervals.
AMP through `torch.autocast` (bf16, or fp16 with a `GradScaler`), `torch.compile` with a
warning fallback, DDP / FSDP2 from `trainer.distributed`; rank 0 alone logs and writes.

Pretraining and SFT also run with ``training.context_parallel`` (each batch cut into the
ranks' zig-zag shares, attention by ring: `trainer.context_parallel`; the step is otherwise
the same) or ``training.pipeline_parallel`` (the step's micro-batches go through a
`torch.distributed.pipelining` schedule over this rank's stages: `trainer.pipeline`).
"""
from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional

import torch
from torch import nn

from data_pipeline.loader import prefetching
from model.moe import moe_load_stats, moe_modules, update_moe_biases
from trainer.compile import compile_blocks, uncompile_blocks
from trainer.checkpointing import CheckpointManager, load_training_checkpoint, resolve_resume, save_training_checkpoint
from trainer.context_parallel import apply_context_parallel, shard_data
from trainer.distributed import DistInfo, all_reduce_sum, check_parallel, no_sync_context, wrap_model
from trainer.evaluation import TextSampler, evaluate, to_device
from trainer.losses import Batch, LossFn, batch_tokens, count_targets, micro_batch_objective, step_counts, step_means
from trainer.metrics import MetricsLogger, Throughput, mfu, peak_flops, peak_memory_gb
from trainer.optim import build_optimizer, set_lr
from trainer.pipeline import Pipeline, optimizer_layout
from trainer.schedule import lr_multiplier
from trainer.spike_guard import Decision, SpikeGuard
from utils.config import ExperimentConfig
from utils.device import autocast_context, pick_dtype
from utils.errors import UserError
from utils.plot_metrics import plot_run
from utils.runs import RunDir

logger = logging.getLogger(__name__)

ParamFilter = Callable[[str, nn.Parameter], bool]


class Trainer:
    """Runs the optimizer steps of one stage. See the module docstring for the protocol.

    Args:
        cfg: the experiment config (``training``, ``logging``, ``checkpointing``, ``model``).
        model: the plain model, on ``dist.device``, identically initialised on every rank.
        loss_fn: ``(model, batch) -> LossOutput`` (sum of per-target losses + their count).
        train_data: an endless iterator of batches (dicts of CPU tensors) with
            ``state_dict()`` / ``load_state_dict()`` for exact resume. A token-bin loader
            (`data_pipeline.loader.ShardedLoader`) builds its batches ahead in
            ``data.num_workers`` background threads (`data_pipeline.loader.Prefetcher`).
        run: the run directory (checkpoints, metrics.jsonl, config.yaml).
        dist: this process's rank / world size / device.
        stage: recorded in checkpoint metadata ("pretrain", "sft", ...).
        val_data: returns a fresh iterator over this rank's validation batches, identical
            at every call; None disables validation.
        count_fn: target tokens of a batch, known before the forward (default: labels != -100).
        trainable: ``(name, param) -> bool``; the others are frozen. None → all parameters.
        optimizer_factory: ``(model) -> Optimizer`` over the trainable parameters; default
            `trainer.optim.build_optimizer` from ``cfg.training``.
        tokenizer_dir: copied into every checkpoint so inference can load it alone.
        sampler: sample generations for the log (`TextSampler`), None disables them.
        flops_per_token: training FLOPs per token, for MFU (None → no MFU).
        checkpoint_config: extra config.json fields of every checkpoint (a reward model's
            ``{"task": "reward_model"}``, `utils.checkpoint.TASK_KEY`).
        validate_first: a fresh run validates once before the first update (step 0 in the
            metrics: the starting model's figures, e.g. online RL's held-out reward).
    """

    def __init__(self, cfg: ExperimentConfig, model: nn.Module, loss_fn: LossFn, train_data: Iterator[Batch],
                 run: RunDir, dist: DistInfo, *, stage: str,
                 val_data: Optional[Callable[[], Iterable[Batch]]] = None,
                 count_fn: Callable[[Batch], int] = count_targets,
                 trainable: Optional[ParamFilter] = None,
                 optimizer_factory: Optional[Callable[[nn.Module], torch.optim.Optimizer]] = None,
                 tokenizer_dir: Optional[Path] = None, sampler: Optional[TextSampler] = None,
                 flops_per_token: Optional[float] = None, checkpoint_config: Optional[dict] = None,
                 validate_first: bool = False) -> None:
        self.cfg, self.tcfg = cfg, cfg.training
        self.loss_fn, self.count_fn = loss_fn, count_fn
        self.train_data, self.val_data = prefetching(train_data, cfg.data.num_workers), val_data
        if cfg.data.num_workers and self.train_data is train_data:
            logger.warning("data.num_workers=%d is ignored: this stage's training data (%s) is not a token-bin "
                           "loader and is produced step by step", cfg.data.num_workers, type(train_data).__name__)
        self.run, self.dist, self.stage = run, dist, stage
        self.device = dist.device
        self.dtype = pick_dtype(self.tcfg.dtype, self.device)
        self.tokenizer_dir, self.sampler, self.flops_per_token = tokenizer_dir, sampler, flops_per_token
        self.checkpoint_config = dict(checkpoint_config or {})

        if trainable is not None:
            for name, p in model.named_parameters():
                p.requires_grad_(trainable(name, p))
        factory = optimizer_factory or (lambda m: build_optimizer(m, self.tcfg))
        check_parallel(dist, self.tcfg, stage)
        self.pipeline: Optional[Pipeline] = None
        if dist.pp > 1:  # this rank keeps its stages' parts of the model
            self.optimizer_layout = optimizer_layout(model, factory(model))  # the checkpoints' param groups
            self.pipeline = Pipeline(model, self.tcfg, dist)
            if self.sampler is not None:
                logger.warning("logging.sample_interval is ignored under pipeline parallelism: no rank holds the "
                               "whole model to sample from")
            model, self.sampler = self.pipeline.module, None
        if dist.cp > 1:  # the ranks of a context-parallel group read the same rows, each its share of them
            apply_context_parallel(model, dist.group("cp"), self.tcfg)
            self.train_data, self.val_data = shard_data(self.train_data, val_data, dist.cp, dist.cp_rank)
        self.base = model
        self.model = model if self.pipeline is not None else wrap_model(model, dist, self.tcfg)
        self._compile_pending = False
        self._compiled_blocks: list[nn.Module] = []
        if self.tcfg.compile:
            self.model = self._compile(self.model)
        self.optimizer = factory(model)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)
        self.guard = SpikeGuard(self.tcfg.spike_threshold, self.tcfg.spike_window, self.tcfg.spike_max_consecutive,
                                self.tcfg.spike_lr_factor, enabled=self.tcfg.spike_guard)
        ck = cfg.checkpointing
        self.ckpt = CheckpointManager(run.checkpoints, ck.keep_last, ck.keep_best, is_writer=dist.is_main)
        self.step = 0  # optimizer steps done (skipped ones included)
        self.tokens_seen = 0  # input tokens consumed, all ranks
        self.losses: list[tuple[int, float]] = []  # (step, loss) of this process's steps, for callers
        self.last_val: Optional[dict[str, float]] = None
        self.last_val_step: Optional[int] = None
        self._saved_step: Optional[int] = None
        self.throughput = Throughput(self.device)
        self.metrics: Optional[MetricsLogger] = None  # created by `fit`
        self.validate_first = validate_first

    # ------------------------------------------------------------------ setup helpers
    def amp(self):
        return autocast_context(self.device, self.dtype)

    def _compile(self, model: nn.Module) -> nn.Module:
        import torch._dynamo

        backend = self.tcfg.compile_backend
        known = torch._dynamo.list_backends(exclude_tags=())
        if backend not in known:
            raise UserError(f"training.compile_backend={backend!r} is not a torch.compile backend "
                            f"(e.g. {', '.join(b for b in ('inductor', 'aot_eager', 'eager') if b in known)})")
        self._compile_pending = True  # the first forward/backward compiles; it may still fail
        self._compiled_blocks = compile_blocks(model, backend)  # regional: one block at a time
        return model

    def resume(self, resume: Optional[str]) -> Optional[Path]:
        """``None`` (fresh start), ``"auto"`` (this run's newest checkpoint, if any) or a path."""
        self.ckpt.clean_stale()
        path = resolve_resume(resume, self.run.checkpoints)
        if path is None:
            if resume == "auto":
                logger.info("--resume auto: no checkpoint in %s yet, starting fresh", self.run.checkpoints)
            return None
        load_training_checkpoint(self, path, restore_data=True)
        if self.dist.is_main:
            self._forget_metrics_after(self.step)
        logger.info("resumed from %s at step %d", path, self.step)
        return path

    def _forget_metrics_after(self, step: int) -> None:
        """Drop metrics.jsonl records of steps the resumed run will redo (logged after the
        checkpoint, before the interruption), so every step appears once."""
        path = self.run.metrics_path
        if not path.exists():
            return
        kept = [line for line in path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, path)

    # ------------------------------------------------------------------ the loop
    def fit(self, stop_at: Optional[int] = None) -> dict[str, Any]:
        """Train until ``training.max_steps`` and write ``checkpoints/final``; returns a summary.

        ``stop_at`` ends earlier, after that step, with a resumable checkpoint (the schedule
        still follows ``max_steps``): training in pieces equals training straight through.
        """
        self.ckpt.clean_stale()
        tcfg, lcfg = self.tcfg, self.cfg.logging
        self.metrics = MetricsLogger(self.run, lcfg, self.dist.is_main, tcfg.max_steps, self.step,
                                     config=self.cfg.model_dump(mode="json"))
        self.throughput = Throughput(self.device)
        window: list[dict[str, float]] = []  # per-step scalars since the last log line
        if self.validate_first and self.step == 0 and self.val_data is not None:
            self.validate()  # the starting model's figures: the baseline of every validation curve
        self.model.train()
        try:
            end = tcfg.max_steps if stop_at is None else min(stop_at, tcfg.max_steps)
            while self.step < end:
                stats = self.train_step()
                decision = stats["decision"]
                window.append({"loss": stats["loss"], "grad_norm": stats["grad_norm"], **stats["sums"]})
                self.metrics.advance(loss=stats["loss"], lr=self.optimizer.param_groups[0]["lr"])
                if decision.action != "step":
                    logger.warning("step %d: update skipped — %s", self.step, decision.reason)
                if decision.action == "rollback":
                    self._rollback(decision)
                    window.clear()
                    continue
                if self.step % lcfg.log_interval == 0 or self.step == tcfg.max_steps:
                    self._log(window)
                    window.clear()
                self._periodic()
            return self._finish(final=self.step >= tcfg.max_steps)
        finally:
            self.metrics.close()

    def train_step(self) -> dict[str, Any]:
        """One optimizer step over `grad_accum_steps` micro-batches (or a skipped one).

        Returns ``loss`` (global mean over the step's targets), ``grad_norm`` (before
        clipping), ``decision`` (the spike guard's), ``sums`` (logged per-target means) and
        ``tokens`` (input tokens of all ranks).
        """
        set_lr(self.optimizer, self.base_lr_multiplier())
        stats = self._forward_backward()
        stats["decision"] = self._update(stats)
        self.step += 1
        self.tokens_seen += stats["tokens"]
        self.losses.append((self.step, stats["loss"]))
        return stats

    def base_lr_multiplier(self) -> float:
        """Schedule multiplier for the update about to happen × the spike guard's LR scale."""
        return lr_multiplier(self.step, self.tcfg) * self.guard.lr_scale

    def _forward_backward(self) -> dict[str, Any]:
        """All micro-batches of one step; returns the step's global mean loss and logged sums."""
        accum = self.tcfg.grad_accum_steps
        micro = [to_device(next(self.train_data), self.device) for _ in range(accum)]
        if self.pipeline is not None:  # the micro-batches go through the pipeline schedule
            with self.amp():
                stats = self.pipeline.forward_backward(micro, self.count_fn, self.dist.dp_size)
            self.throughput.add(stats["tokens"])
            return stats
        local_counts = step_counts(self.base, micro, self.count_fn)  # main targets + each term's own
        count_names = list(local_counts)
        reduced = all_reduce_sum(torch.tensor([local_counts[k] for k in count_names], dtype=torch.int64,
                                              device=self.device))
        counts = {k: max(int(v), 1) for k, v in zip(count_names, reduced.tolist())}
        sums: dict[str, torch.Tensor] = {}
        terms: dict[str, torch.Tensor] = {}
        aux = torch.zeros((), dtype=torch.float64, device=self.device)
        for i, batch in enumerate(micro):
            out = self._loss_and_backward(batch, counts, is_last=i == accum - 1)
            for k, v in {"loss": out.loss_sum, **out.sums}.items():
                sums[k] = sums.get(k, 0) + v.detach().double()
            for k, v in out.terms.items():
                terms[k] = terms.get(k, 0) + v.detach().double()
            if out.aux_loss is not None:
                aux += out.aux_loss.detach().double() / accum
        names, term_names = list(sums), list(terms)
        packed = all_reduce_sum(torch.stack([sums[k] for k in names] + [terms[k] for k in term_names] + [aux]))
        flat = packed.tolist()
        logged = step_means(dict(zip(names, flat)), counts)  # per-target means over the whole step
        loss = logged.pop("loss") + sum(step_means(dict(zip(term_names, flat[len(names):-1])), counts).values())
        if out.aux_loss is not None:
            logged["aux"] = flat[-1] / self.dist.world_size  # mean over micro-batches and ranks
        local = sum(batch_tokens(b) or self.count_fn(b) for b in micro)
        self.throughput.add(local * self.dist.world_size)
        return {"loss": loss, "sums": logged, "tokens": local * self.dist.world_size}

    def _loss_and_backward(self, batch: Batch, counts: dict[str, int], is_last: bool):
        """One micro-batch; the first one under torch.compile falls back to eager on failure."""
        try:
            out = self._micro_step(batch, counts, is_last)
        except Exception as e:  # compile failures come in many exception types
            if not self._compile_pending:
                raise
            first_line = (str(e).strip().splitlines() or [""])[0]
            logger.warning("torch.compile (backend %s) failed, continuing without it: %s: %s",
                           self.tcfg.compile_backend, type(e).__name__, first_line)
            uncompile_blocks(self._compiled_blocks)
            self._compile_pending = False
            self.optimizer.zero_grad(set_to_none=True)
            out = self._micro_step(batch, counts, is_last)
        self._compile_pending = False
        return out

    def _micro_step(self, batch: Batch, counts: dict[str, int], is_last: bool):
        with no_sync_context(self.model, is_last):
            with self.amp():
                out = self.loss_fn(self.model, batch)
            loss = micro_batch_objective(out, counts["targets"], self.dist.world_size, self.tcfg.grad_accum_steps,
                                         global_counts=counts)
            self.scaler.scale(loss).backward()
        return out

    def _update(self, stats: dict[str, Any]) -> Decision:
        """Clip, judge, then step the optimizer or skip the update."""
        if self.scaler.is_enabled():
            self.scaler.unscale_(self.optimizer)
        max_norm = self.tcfg.grad_clip if self.tcfg.grad_clip > 0 else float("inf")
        if self.pipeline is not None:
            norm = self.pipeline.clip_grad_norm(max_norm)  # over all stages
        else:
            norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        stats["grad_norm"] = grad_norm = float(norm.item())
        loss = stats["loss"]
        if self.scaler.is_enabled() and math.isfinite(loss) and not math.isfinite(grad_norm):
            decision = Decision("skip", f"fp16 gradient overflow, loss scale lowered from {self.scaler.get_scale():g}")
            self.scaler.step(self.optimizer)  # sees the inf and skips
            self.scaler.update()
        else:
            decision = self.guard.check(self.step, loss, grad_norm)
            if decision.action == "step":
                self.scaler.step(self.optimizer)
                self.scaler.update()
            elif self.scaler.is_enabled():
                # end the scaler's step (unscale_ ran) without a loss-scale change: the guard, not
                # an fp16 overflow, rejected this update. Without it the next unscale_ raises.
                self.scaler.update(new_scale=self.scaler.get_scale())
        if decision.action == "step":
            update_moe_biases(self.base, self.dist.group("dp") if self.pipeline is not None else None)
        else:
            for _, layer in moe_modules(self.base):  # drop the skipped step's expert counts
                layer.tokens_per_expert.zero_()
        self.optimizer.zero_grad(set_to_none=True)
        return decision

    def _rollback(self, decision: Decision) -> None:
        start = self.guard.streak_start if self.guard.streak_start is not None else self.step
        target = self.ckpt.newest_before(start)
        if target is None:
            raise UserError(f"training diverged at step {self.step} ({decision.reason}) and no checkpoint from "
                            f"before step {start + 1} exists to roll back to: lower training.learning_rate or save "
                            "earlier (checkpointing.save_interval)")
        load_training_checkpoint(self, target, restore_data=False)
        self.guard.on_rollback()
        logger.warning("rolled back to %s (step %d); data continues past the bad batches; LR scale now %g",
                       target.name, self.step, self.guard.lr_scale)
        for stale in self.ckpt.discard_after(self.step):  # the diverging stretch: never resume from it
            logger.warning("deleted %s, saved after the rollback target", stale.name)
        # supersede the target with the run's state now (same weights, lowered LR scale, data
        # position past the bad batches): what `--resume auto` must continue from
        self.save()
        if self.metrics is not None:
            self.metrics.reset_bar(self.step)

    # ------------------------------------------------------------------ logging, eval, saving
    def _log(self, window: list[dict[str, float]]) -> None:
        """One metrics record: means over the steps since the last one, plus rates and memory."""
        tps = self.throughput.measure()
        record: dict[str, Any] = {k: sum(w[k] for w in window) / len(window) for k in window[-1]}
        record.update({
            "lr": self.optimizer.param_groups[0]["lr"], "tokens_per_s": tps, "tokens_seen": self.tokens_seen,
            "peak_mem_gb": peak_memory_gb(self.device), "skipped_steps": self.guard.skipped_total,
        })
        if self.flops_per_token is not None:
            peak, source = peak_flops(self.device, self.dtype)
            record["mfu"] = mfu(self.flops_per_token, tps, peak, self.dist.world_size)
            record["mfu_peak_source"] = source
        record.update({k: v for k, v in moe_load_stats(self.base).items() if k in ("moe/max_min_ratio", "moe/cv")})
        record.update(self.extra_metrics())
        self._record(record)
        logger.info("step %d/%d | loss %.4f | lr %.3g | grad %.3g | %.0f tok/s%s", self.step, self.tcfg.max_steps,
                    record["loss"], record["lr"], record["grad_norm"], tps,
                    f" | mfu {100 * record['mfu']:.1f}%" if "mfu" in record else "")

    def extra_metrics(self) -> dict[str, Any]:
        """Stage-specific scalars for the next metrics record (online RL: its rollout statistics)."""
        return {}

    def final_weights(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """What ``checkpoints/final`` holds of the full model state (PPO: the policy, not its critic)."""
        return state

    def _record(self, record: dict[str, Any]) -> None:
        if self.metrics is not None:
            self.metrics.log(self.step, record)

    def _periodic(self) -> None:
        last = self.step == self.tcfg.max_steps
        if self.val_data is not None and (self.step % self.tcfg.eval_interval == 0 or last):
            self.validate()
        interval = self.cfg.logging.sample_interval
        if self.sampler is not None and interval > 0 and (self.step % interval == 0 or last):
            text = self.sampler(self.base, self.step, self.amp)  # every rank: FSDP2 gathers shards
            self._record({"sample": text})
            logger.info("sample at step %d: %s", self.step, text.replace("\n", " "))
        if self.step % self.cfg.checkpointing.save_interval == 0 or last:
            self.save()

    def validate(self) -> dict[str, float]:
        """Validation loss / perplexity over ``eval_steps`` batches per rank (all-reduced)."""
        if self.pipeline is not None:
            result = self.pipeline.evaluate(self.val_data(), self.tcfg.eval_steps, self.device, self.amp)
        else:
            result = evaluate(self.model, self.val_data(), self.loss_fn, self.tcfg.eval_steps, self.device, self.amp)
        self.last_val, self.last_val_step = result, self.step
        best = self.ckpt.note_validation(result["val_loss"])
        self._record({**result, "best": best})
        shown = [f"{k[len('val_'):]} {v:.4g}" for k, v in result.items() if k not in ("val_loss", "val_tokens")]
        logger.info("step %d | val loss %.4f%s%s", self.step, result["val_loss"],
                    "".join(f" | {s}" for s in shown), " (best)" if best else "")
        return result

    def save(self) -> Optional[Path]:
        """Write ``step_NNNNNNNN`` (every rank takes part; rank 0 writes)."""
        path = save_training_checkpoint(self)
        self._saved_step = self.step
        if path is not None:
            logger.info("saved %s", path)
        return path

    def _finish(self, final: bool) -> dict[str, Any]:
        if self._saved_step != self.step:
            self.save()
        final_path = save_training_checkpoint(self, final=True) if final else None
        if self.dist.is_main:
            plot_run(self.run.root)
            if final_path is not None:
                logger.info("final weights: %s", final_path)
        return {"step": self.step, "loss": self.losses[-1][1] if self.losses else None,
                "val": self.last_val, "final_checkpoint": final_path}
