"""The rollout source of online RL: an iterator of training micro-batches that samples them itself.

The training engine (`trainer.engine.Trainer`) draws micro-batches from its data iterator; for
RL that iterator is a `RolloutSource`. When its buffer is empty it makes a *rollout*:

1. takes the next ``prompts_per_step`` prompts (this rank's share: prompt ``k`` of the step
   goes to rank ``k % world_size``, so a prompt's whole group stays on one rank);
2. samples ``group_size`` completions of each through the one generation engine
   (`inference.engine.LLMEngine`, paged KV cache, continuous batching) built on the *live*
   policy: the engine shares the training weights, nothing is saved or copied. The first
   sample of every prompt is prefilled before the others join, so the other G-1 reuse its
   prompt blocks through prefix caching; the prefix cache is reset before every rollout
   because the weights changed. Every request has its own seed (`rl_data.request_seed`),
   so a rollout is the same on 1 or N ranks and after a resume;
3. scores them with the reward functions (`align.rewards.RewardFunctions`);
4. computes advantages: group-normalised (GRPO / GSPO; DAPO's dynamic sampling first drops
   groups whose rewards are all equal and refills from later prompts), GAE over the value
   model's estimates with the KL penalty in the per-token reward (PPO), or keeps only the
   samples whose reward reaches ``min_reward`` (RFT);
5. computes the old policy's and the reference's per-token log-probs with the *training*
   forward (no grad), micro-batch by micro-batch;

and then yields the micro-batches of ``updates_per_rollout`` optimizer steps. Its
``state_dict`` holds the prompt cursor, the rollout count and the unconsumed buffer, so a run
resumed mid-rollout continues bit for bit.
"""
from __future__ import annotations

import logging
import math
import time
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from align.rewards import RewardFunctions
from align.rl_config import RLSection
from align.rl_data import PromptRecord, Sample, collate, request_seed, sft_rows, slice_batch
from align.rl_losses import gae, group_advantages, kl_k1, ppo_token_rewards, whiten, zero_variance_groups
from data_pipeline.chat import ChatTokenizer
from inference.engine.llm_engine import LLMEngine
from inference.engine.loading import LoadedModel
from inference.engine.sampling import SamplingParams
from trainer.distributed import DistInfo, all_reduce_sum

logger = logging.getLogger(__name__)
Batch = dict[str, Tensor]


# ---------------------------------------------------------------------------- log-probs
def token_logps(logits: Tensor, input_ids: Tensor, temperature: float) -> Tensor:
    """Per-token log-probs of the next tokens: logits (B, T, V), input_ids (B, T) → (B, T-1),
    from ``log_softmax(logits / temperature)`` (the distribution the engine sampled from)."""
    scaled = logits[:, :-1].float() / temperature  # (B, T-1, V)
    picked = scaled.gather(-1, input_ids[:, 1:, None]).squeeze(-1)  # (B, T-1)
    return picked - torch.logsumexp(scaled, dim=-1)


def completion_logps(model: nn.Module, input_ids: Tensor, mask: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """The policy's log-probs of the completion tokens, (B, T-1) in target space (0 elsewhere),
    and the logits they came from (N, V), N = mask.sum(). The LM head runs only at the positions
    that predict a completion token (``keep``), not over the prompts."""
    m = mask.bool()  # (B, T-1)
    keep = torch.zeros(input_ids.shape, dtype=torch.bool, device=input_ids.device)  # (B, T)
    keep[:, :-1] = m
    logits = model(input_ids, keep=keep)  # (N, V)
    scaled = logits.float() / temperature
    targets = input_ids[:, 1:][m]  # (N,)
    picked = scaled.gather(-1, targets[:, None]).squeeze(-1) - torch.logsumexp(scaled, dim=-1)  # (N,)
    return torch.zeros(m.shape, dtype=picked.dtype, device=picked.device).masked_scatter(m, picked), logits


@torch.no_grad()
def batched_logps(model: nn.Module, batch: Batch, temperature: float, batch_size: int, amp) -> Tensor:
    """(B, T-1) log-probs of a whole rollout batch, ``batch_size`` rows per forward, eval mode."""
    was_training = model.training
    model.eval()
    out = torch.zeros(batch["mask"].shape)
    try:
        for start in range(0, batch["input_ids"].shape[0], batch_size):
            rows = slice(start, start + batch_size)
            device = next(model.parameters()).device
            with amp():
                lp, _ = completion_logps(model, batch["input_ids"][rows].to(device), batch["mask"][rows].to(device),
                                         temperature)
            out[rows] = lp.float().cpu()
    finally:
        model.train(was_training)
    return out


# ---------------------------------------------------------------------------- generation
class Generator:
    """Samples groups of completions from the live policy through the paged engine."""

    def __init__(self, policy: nn.Module, model_cfg, tokenizer, tokenizer_file, ct: ChatTokenizer,
                 rl: RLSection, max_num_seqs: int) -> None:
        loaded = LoadedModel(policy, model_cfg, tokenizer, tokenizer_file, ct.im_end_id)
        self.policy, self.rl, self.ct = policy, rl, ct
        self.engine = LLMEngine(loaded, max_num_seqs=max_num_seqs, kv_cache_memory_mb=rl.kv_cache_memory_mb,
                                max_num_batched_tokens=max(2048, max_num_seqs * 2))

    def params(self, seed: int) -> SamplingParams:
        s = self.rl.sampling
        return SamplingParams(temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, seed=seed, stop=list(s.stop),
                              stop_token_ids=[self.ct.im_end_id], max_tokens=s.max_new_tokens)

    @torch.no_grad()
    def generate(self, prompts: list[PromptRecord], group_size: int, seeds: list[list[int]]) -> list[list[Sample]]:
        """``group_size`` samples of each prompt (``seeds[i][j]`` for sample j of prompt i)."""
        engine = self.engine
        was_training = self.policy.training
        self.policy.eval()
        engine.reset_prefix_cache()  # the weights changed since the last rollout
        results: dict[str, dict[str, Any]] = {}
        where: dict[str, tuple[int, int]] = {}

        def add(i: int, j: int) -> None:
            rid = engine.add_request(prompts[i].ids, self.params(seeds[i][j]), request_id=f"p{i}s{j}")
            where[rid] = (i, j)
            results[rid] = {"tokens": [], "text": [], "reason": None}

        def step() -> list:
            outs = engine.step()
            for out in outs:
                r = results[out.request_id]
                r["tokens"] += out.new_token_ids
                r["text"].append(out.new_text)
                if out.finished:
                    r["reason"] = out.finish_reason
            return outs

        try:
            for i in range(len(prompts)):  # first samples: their prefill fills the prefix cache
                add(i, 0)
            first = set(results)
            while first and engine.has_unfinished():
                first -= {o.request_id for o in step()}
            for i in range(len(prompts)):
                for j in range(1, group_size):
                    add(i, j)
            while engine.has_unfinished():
                step()
        finally:
            self.policy.train(was_training)
        groups: list[list[Optional[Sample]]] = [[None] * group_size for _ in prompts]
        for rid, r in results.items():
            i, j = where[rid]
            groups[i][j] = Sample(prompts[i], r["tokens"], "".join(r["text"]), r["reason"])
        return groups  # type: ignore[return-value]


# ---------------------------------------------------------------------------- the source
class RolloutSource:
    """Endless micro-batches for the engine, made by rollouts (see the module docstring).

    ``reference``: ``ids batch -> (B, T-1) log-probs`` of the reference (None: no KL term);
    ``value_model``: PPO's critic (`model.reward.RewardModel`, per-token values);
    ``grad_accum``: micro-batches per optimizer step on this rank.
    """

    def __init__(self, rl: RLSection, prompts: list[PromptRecord], generator: Generator, rewards: RewardFunctions,
                 dist: DistInfo, seed: int, batch_size: int, grad_accum: int, amp: Callable, pad_id: int,
                 reference: Optional[Callable[[Batch], Tensor]] = None,
                 value_model: Optional[nn.Module] = None) -> None:
        self.rl, self.prompts, self.generator, self.rewards = rl, prompts, generator, rewards
        self.dist, self.seed, self.batch_size, self.grad_accum = dist, seed, batch_size, grad_accum
        self.amp, self.pad_id = amp, pad_id
        self.reference, self.value_model = reference, value_model
        self.cursor = 0  # prompts consumed (all ranks), wraps around the train prompts
        self.rollouts = 0  # rollouts made
        self.buffer: list[Batch] = []  # micro-batches still to yield
        self.stats: list[dict[str, float]] = []  # per-rollout metrics since the last `pop_stats`

    # ---- iterator and exact resume
    def __iter__(self) -> "RolloutSource":
        return self

    def __next__(self) -> Batch:
        if not self.buffer:
            self.buffer = self._rollout()
        return self.buffer.pop(0)

    def state_dict(self) -> dict[str, Any]:
        return {"cursor": self.cursor, "rollouts": self.rollouts, "buffer": [dict(b) for b in self.buffer]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.cursor, self.rollouts = int(state["cursor"]), int(state["rollouts"])
        self.buffer = [{k: torch.as_tensor(v) for k, v in b.items()} for b in state["buffer"]]

    def pop_stats(self) -> dict[str, float]:
        """Mean of every rollout metric since the last call (already global over ranks)."""
        stats, self.stats = self.stats, []
        if not stats:
            return {}
        return {k: sum(s[k] for s in stats) / len(stats) for k in stats[-1]}

    # ---- one rollout
    def _take_prompts(self, n_global: int) -> tuple[list[PromptRecord], list[int]]:
        """This rank's share of the next ``n_global`` prompts, and their positions in the step."""
        picked, slots = [], []
        for k in range(n_global):
            if k % self.dist.world_size == self.dist.rank:
                picked.append(self.prompts[(self.cursor + k) % len(self.prompts)])
                slots.append(self.cursor + k)
        self.cursor += n_global
        return picked, slots

    def _sample(self, n_global: int, group_size: int, tag: str) -> tuple[list[Sample], Tensor, dict[str, Tensor]]:
        """Generate and score: samples (prompt-major), total rewards (N,), per-function rewards."""
        prompts, slots = self._take_prompts(n_global)
        seeds = [[request_seed(self.seed, tag, self.rollouts, slot, j) for j in range(group_size)] for slot in slots]
        groups = self.generator.generate(prompts, group_size, seeds)
        samples = [s for g in groups for s in g]
        total, parts = self.rewards([s.prompt.prompt for s in samples], [s.text for s in samples],
                                    [s.prompt.record for s in samples])
        return samples, total, parts

    def _rollout(self) -> list[Batch]:
        rl = self.rl
        t0 = time.perf_counter()
        n_global = rl.prompts_per_step
        if rl.algorithm == "rft":
            batches, stats = self._rft_rollout(n_global)
        else:
            samples, rewards, parts, stats = self._grouped_samples(n_global)
            batch = collate(samples, self.pad_id)
            t_gen = time.perf_counter()
            stats["time/generate_s"] = t_gen - t0  # sampling and scoring
            if rl.algorithm == "ppo":
                self._ppo_fields(batch, rewards)
            else:
                self._grpo_fields(batch, rewards)
            stats["time/logps_s"] = time.perf_counter() - t_gen  # old-policy / reference log-probs, values
            batches = self._schedule(batch)
        stats["time/rollout_s"] = time.perf_counter() - t0
        self.rollouts += 1
        self.stats.append(stats)
        return batches

    def _grouped_samples(self, n_global: int) -> tuple[list[Sample], Tensor, dict[str, Tensor], dict[str, float]]:
        """The rollout's samples; with dynamic sampling, groups with zero reward variance are
        replaced by groups of later prompts (up to ``max_refills`` refills, each as many prompts as
        the shortfall needs at the share kept so far; if still short, zero-variance groups fill the
        batch so every rank keeps its size)."""
        rl, G = self.rl, self.rl.group_size
        samples, rewards, parts = self._sample(n_global, G, "train")
        if not rl.dynamic_sampling:
            return samples, rewards, parts, self._reward_stats(rewards, parts, samples)
        want = len(samples) // G
        keep = ~zero_variance_groups(rewards, G)  # (groups,)
        pool = [(samples, rewards, parts, keep)]
        dropped = total_groups = int(keep.numel())
        dropped -= int(keep.sum())
        refills = 0
        while refills < rl.max_refills and (kept := self._global_min(sum(int(p[3].sum()) for p in pool))) < want:
            s, r, p = self._sample(self._refill_size(want - kept, pool, n_global), G, f"refill{refills}")
            k = ~zero_variance_groups(r, G)
            pool.append((s, r, p, k))
            total_groups += int(k.numel())
            dropped += int(k.numel() - k.sum())
            refills += 1
        chosen: list[tuple[int, int]] = [(a, g) for a, (_, _, _, k) in enumerate(pool) for g in range(k.numel()) if k[g]]
        chosen += [(a, g) for a, (_, _, _, k) in enumerate(pool) for g in range(k.numel()) if not k[g]]
        chosen = chosen[:want]
        out_s = [s for a, g in chosen for s in pool[a][0][g * G:(g + 1) * G]]
        out_r = torch.cat([pool[a][1][g * G:(g + 1) * G] for a, g in chosen])
        out_p = {name: torch.cat([pool[a][2][name][g * G:(g + 1) * G] for a, g in chosen]) for name in parts}
        stats = self._reward_stats(torch.cat([p[1] for p in pool]),
                                   {name: torch.cat([p[2][name] for p in pool]) for name in parts},
                                   [x for p in pool for x in p[0]])
        counts = all_reduce_sum(torch.tensor([dropped, total_groups, refills], dtype=torch.float64))
        stats.update({"dynamic/dropped_groups_frac": float(counts[0] / counts[1]),
                      "dynamic/refills": float(counts[2] / self.dist.world_size)})
        return out_s, out_r, out_p, stats

    def _refill_size(self, short: int, pool: list, n_global: int) -> int:
        """Prompts (all ranks) of the next refill: enough for the most short rank at the share of
        groups kept so far (over every rank, so all ranks agree), a whole number per rank, at most
        one full prompt batch. A refill of the full batch would throw most of its groups away."""
        counts = all_reduce_sum(torch.tensor([sum(int(p[3].sum()) for p in pool), sum(p[3].numel() for p in pool)],
                                             dtype=torch.float64))
        per_rank = math.ceil(short / max(float(counts[0] / counts[1]), 0.1))
        world = self.dist.world_size
        return min(per_rank * world, math.ceil(n_global / world) * world)

    def _global_min(self, value: int) -> int:
        """The smallest value over ranks (every rank refills as long as any rank is short)."""
        t = torch.tensor([-value], dtype=torch.float64)
        if self.dist.is_distributed:
            import torch.distributed as tdist
            tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
        return int(-t.item())

    def _reward_stats(self, rewards: Tensor, parts: dict[str, Tensor], samples: list[Sample]) -> dict[str, float]:
        """Global mean / std of the rewards of every sample generated (dropped groups included),
        each function's mean, completion lengths and the share cut off at max_new_tokens."""
        lengths = torch.tensor([len(s.completion_ids) for s in samples], dtype=torch.float64)
        truncated = torch.tensor([s.finish_reason == "length" for s in samples], dtype=torch.float64)
        r = rewards.double()
        sums = torch.stack([torch.tensor(float(r.numel()), dtype=torch.float64), r.sum(), (r * r).sum(),
                            lengths.sum(), truncated.sum(), *[p.double().sum() for p in parts.values()]])
        sums = all_reduce_sum(sums)
        n = sums[0].item()
        mean = sums[1].item() / n
        var = max(sums[2].item() / n - mean * mean, 0.0)
        out = {"reward": mean, "reward_std": math.sqrt(var * n / max(n - 1, 1)),
               "completion_length": sums[3].item() / n, "truncated_frac": sums[4].item() / n}
        out.update({f"rewards/{name}": sums[5 + i].item() / n for i, name in enumerate(parts)})
        return out

    def _grpo_fields(self, batch: Batch, rewards: Tensor) -> None:
        rl = self.rl
        batch_std = None
        if rl.scale_rewards == "batch":  # the std over the whole global batch
            r = rewards.double()
            s = all_reduce_sum(torch.stack([torch.tensor(float(r.numel()), dtype=torch.float64), r.sum(),
                                            (r * r).sum()]))
            n, mean = s[0].item(), s[1].item() / s[0].item()
            batch_std = torch.tensor(math.sqrt(max(s[2].item() / n - mean * mean, 0.0) * n / max(n - 1, 1)),
                                     dtype=rewards.dtype)
        batch["advantages"] = group_advantages(rewards, rl.group_size, rl.scale_rewards, batch_std=batch_std)
        if rl.mask_truncated_completions:  # DAPO's overlong filtering: no gradient from cut-off samples
            batch["mask"][batch["truncated"]] = 0.0
        if rl.num_iterations > 1:  # later iterations see a changed policy: keep the sampling one's log-probs
            batch["old_logps"] = self._policy_logps(batch)
        if self.reference is not None:
            batch["ref_logps"] = self.reference(batch)

    def _policy_logps(self, batch: Batch) -> Tensor:
        return batched_logps(self.generator.policy, batch, self.rl.sampling.temperature, self.batch_size, self.amp)

    @torch.no_grad()
    def _ppo_fields(self, batch: Batch, scores: Tensor) -> None:
        """Old log-probs, reference log-probs, values, per-token rewards, GAE, (whitened) advantages."""
        rl, mask = self.rl, batch["mask"]
        batch["old_logps"] = self._policy_logps(batch)
        ref = self.reference(batch) if self.reference is not None else None
        if ref is not None and rl.kl_penalty == "loss":
            batch["ref_logps"] = ref
        kl = kl_k1(batch["old_logps"], ref) * mask if ref is not None and rl.kl_penalty == "reward" \
            else torch.zeros_like(mask)
        values = self._values(batch) * mask  # (B, T-1)
        token_rewards = ppo_token_rewards(scores.float(), kl, mask, rl.kl_coef if ref is not None else 0.0)
        advantages, returns = gae(token_rewards, values, mask, rl.gamma, rl.lam)
        if rl.whiten_advantages:
            advantages = self._global_whiten(advantages, mask)
        batch.update(advantages=advantages * mask, returns=returns, old_values=values)

    def _values(self, batch: Batch) -> Tensor:
        model = self.value_model
        was_training = model.training
        model.eval()
        out = torch.zeros(batch["mask"].shape)
        device = next(model.parameters()).device
        try:
            for start in range(0, batch["input_ids"].shape[0], self.batch_size):
                rows = slice(start, start + self.batch_size)
                with self.amp():
                    v = model.token_rewards(batch["input_ids"][rows].to(device))  # (b, T)
                out[rows] = v[:, :-1].float().cpu()
        finally:
            model.train(was_training)
        return out

    def _global_whiten(self, x: Tensor, mask: Tensor) -> Tensor:
        """Whitening over the masked tokens of every rank (`rl_losses.whiten` in one process)."""
        if not self.dist.is_distributed:
            return whiten(x, mask)
        s = all_reduce_sum(torch.stack([mask.sum(), (x * mask).sum()]).double())
        mean = s[1] / s[0]
        var = all_reduce_sum((((x - mean) ** 2) * mask).sum().double()[None])[0] / (s[0] - 1).clamp(min=1)
        return ((x - mean) * torch.rsqrt(var + 1e-8)).float()

    def _schedule(self, batch: Batch) -> list[Batch]:
        """The micro-batches of every optimizer step this rollout feeds, in order: for each pass
        (iteration / PPO epoch) a permutation of the rows (identity for the first), split into
        minibatches (one per optimizer step), each split into ``grad_accum`` micro-batches."""
        rl, n = self.rl, batch["input_ids"].shape[0]
        passes = rl.ppo_epochs if rl.algorithm == "ppo" else rl.num_iterations
        minibatches = rl.num_minibatches if rl.algorithm == "ppo" else 1
        batch = {k: v for k, v in batch.items() if k not in ("completion_len", "truncated")}
        out = []
        for p in range(passes):
            g = torch.Generator().manual_seed(request_seed(self.seed, "shuffle", self.rollouts, p))
            order = torch.arange(n) if p == 0 or minibatches == 1 else torch.randperm(n, generator=g)
            for mb in order.tensor_split(minibatches):
                out += [slice_batch(batch, micro) for micro in mb.tensor_split(self.grad_accum)]
        return out

    def _rft_rollout(self, n_global: int) -> tuple[list[Batch], dict[str, float]]:
        """Rejection sampling: keep the samples whose reward reaches ``min_reward`` (once per
        distinct completion of a prompt), then ``steps_per_round`` SFT steps over them."""
        rl = self.rl
        samples, rewards, parts = self._sample(n_global, rl.group_size, "train")
        stats = self._reward_stats(rewards, parts, samples)
        kept, seen = [], set()
        for s, r in zip(samples, rewards.tolist()):
            key = (s.prompt.index, tuple(s.completion_ids))
            if r >= rl.min_reward and key not in seen:
                seen.add(key)
                kept.append(s)
        n_kept = all_reduce_sum(torch.tensor([float(len(kept)), float(len(samples))], dtype=torch.float64))
        stats["rft/kept_frac"] = float(n_kept[0] / n_kept[1])
        if not kept:  # nothing verified on this rank: the steps see no targets (zero gradient)
            empty = sft_rows(samples[:1], self.pad_id)
            empty["labels"].fill_(-100)
            return [dict(empty) for _ in range(rl.steps_per_round * self.grad_accum)], stats
        rows = sft_rows(kept, self.pad_id)
        out = []
        for step in range(rl.steps_per_round):
            g = torch.Generator().manual_seed(request_seed(self.seed, "rft", self.rollouts, step))
            order = torch.randperm(len(kept), generator=g)
            parts_ = order.tensor_split(self.grad_accum)
            out += [{k: v[idx if idx.numel() else order[:1]] for k, v in rows.items()} for idx in parts_]
        return out, stats
