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

and then yields the micro-batches of ``updates_per_rollout`` optimizer steps. A micro-batch
holds its samples' completion-space tensors (S, L) and their packed rows for the training
forward (`rl_data.pack_rows`: with ``rl.share_prompts`` each prompt once, followed by its
completions, so a group of G costs one prompt, not G). Its
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
from align.rl_data import PromptRecord, Sample, cat_samples, completion_batch, pack_rows, request_seed, sft_rows
from align.rl_losses import gae, group_advantages, kl_k1, ppo_token_rewards, whiten, zero_variance_groups
from data_pipeline.chat import ChatTokenizer
from inference.engine.llm_engine import LLMEngine
from inference.engine.loading import LoadedModel
from inference.engine.sampling import SamplingParams
from trainer.distributed import DistInfo, all_reduce_sum

logger = logging.getLogger(__name__)
Batch = dict[str, Tensor]


# ---------------------------------------------------------------------------- log-probs
def forward_inputs(batch: Batch) -> dict[str, Tensor]:
    """The packed rows' keyword arguments of the model's forward (`rl_data.pack_rows`)."""
    return {k: batch[k] for k in ("positions", "doc_ids") if k in batch}


def completion_logps(model: nn.Module, batch: Batch, temperature: float) -> tuple[Tensor, Tensor, Tensor]:
    """The policy's log-probs of the completion tokens (S, L) (0 off the mask), from
    ``log_softmax(logits / temperature)`` (the distribution the engine sampled from); the
    logits (U, V) they came from and, for each masked token in row-major order, its row of
    them (N,). The LM head runs once per position that predicts a masked completion token
    (``keep``), not over the prompts; with shared prompts, a prompt's last position serves the
    first token of all its completions."""
    m = batch["mask"].bool()  # (S, L)
    ids = batch["input_ids"]  # (R, W)
    src = batch["src"].to(ids.device)[m]  # (N,) flat positions in the packed rows
    keep = torch.zeros(ids.numel(), dtype=torch.bool, device=ids.device)
    keep[src] = True
    logits = model(ids, keep=keep.view(ids.shape), **forward_inputs(batch))  # (U, V)
    rows = keep.cumsum(0)[src] - 1  # (N,)
    scaled = logits.float() / temperature
    lse = torch.logsumexp(scaled, dim=-1)  # (U,)
    picked = scaled[rows, batch["completion"].to(ids.device)[m]] - lse[rows]  # (N,)
    return torch.zeros(m.shape, dtype=picked.dtype, device=picked.device).masked_scatter(m, picked), logits, rows


@torch.no_grad()
def batched_logps(model: nn.Module, micros: list[Batch], temperature: float, amp) -> Tensor:
    """(S, L) log-probs of a rollout given as consecutive micro-batches, eval mode."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = []
    try:
        for micro in micros:
            with amp():
                lp, _, _ = completion_logps(model, {k: v.to(device) for k, v in micro.items()}, temperature)
            out.append(lp.float().cpu())
    finally:
        model.train(was_training)
    return cat_samples(out)


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

    ``reference``: ``micro-batches -> (S, L) log-probs`` of the reference (None: no KL term);
    ``value_model``: PPO's critic (`model.reward.RewardModel`, per-token values);
    ``grad_accum``: micro-batches per optimizer step on this rank; ``share_prompts``: pack a
    prompt once with its completions in the training forward (`rl_data.pack_rows`).
    """

    def __init__(self, rl: RLSection, prompts: list[PromptRecord], generator: Generator, rewards: RewardFunctions,
                 dist: DistInfo, seed: int, batch_size: int, grad_accum: int, amp: Callable, pad_id: int,
                 reference: Optional[Callable[[list[Batch]], Tensor]] = None,
                 value_model: Optional[nn.Module] = None, share_prompts: bool = True) -> None:
        self.rl, self.prompts, self.generator, self.rewards = rl, prompts, generator, rewards
        self.dist, self.seed, self.batch_size, self.grad_accum = dist, seed, batch_size, grad_accum
        self.amp, self.pad_id = amp, pad_id
        self.reference, self.value_model, self.share_prompts = reference, value_model, share_prompts
        self.cursor = 0  # prompts consumed (all ranks), wraps around the train prompts
        self.zero_streak: dict[int, int] = {}  # prompt index -> its last groups with equal rewards in a row
        self.passed_over = 0  # prompts skipped (skip_zero_variance) since the last rollout's stats
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
        return {"cursor": self.cursor, "rollouts": self.rollouts, "buffer": [dict(b) for b in self.buffer],
                "zero_streak": dict(self.zero_streak)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.cursor, self.rollouts = int(state["cursor"]), int(state["rollouts"])
        self.zero_streak = {int(k): int(v) for k, v in state.get("zero_streak", {}).items()}
        self.buffer = [{k: torch.as_tensor(v) for k, v in b.items()} for b in state["buffer"]]

    def pop_stats(self) -> dict[str, float]:
        """Mean of every rollout metric since the last call (already global over ranks)."""
        stats, self.stats = self.stats, []
        if not stats:
            return {}
        return {k: sum(s[k] for s in stats) / len(stats) for k in stats[-1]}

    # ---- one rollout
    def _take_prompts(self, n_global: int) -> tuple[list[PromptRecord], list[int], list[int]]:
        """This rank's share of the next ``n_global`` prompts taken, their positions in the stream
        (request seeds) and their indices among the taken ones (all ranks). With
        ``rl.skip_zero_variance`` = s, a prompt whose last z groups all had equal rewards is passed
        over with probability 1 - (1 - s)^z (a seeded draw per stream position: every rank and a
        resumed run decide alike), at most one pass over the prompts per call."""
        picked, slots, taken_at = [], [], []
        skip = self.rl.skip_zero_variance or 0.0
        taken = passed = 0
        while taken < n_global:
            slot = self.cursor
            prompt = self.prompts[slot % len(self.prompts)]
            self.cursor += 1
            z = self.zero_streak.get(prompt.index, 0)
            if z and passed < len(self.prompts) and \
                    request_seed(self.seed, "skip", slot) / 2 ** 56 < 1.0 - (1.0 - skip) ** z:
                passed += 1
                continue
            if taken % self.dist.world_size == self.dist.rank:
                picked.append(prompt)
                slots.append(slot)
                taken_at.append(taken)
            taken += 1
        self.passed_over += passed
        return picked, slots, taken_at

    def _sample(self, n_global: int, group_size: int, tag: str) -> tuple[list[Sample], Tensor, dict[str, Tensor]]:
        """Generate and score: samples (prompt-major), total rewards (N,), per-function rewards."""
        prompts, slots, taken_at = self._take_prompts(n_global)
        seeds = [[request_seed(self.seed, tag, self.rollouts, slot, j) for j in range(group_size)] for slot in slots]
        groups = self.generator.generate(prompts, group_size, seeds)
        samples = [s for g in groups for s in g]
        total, parts = self.rewards([s.prompt.prompt for s in samples], [s.text for s in samples],
                                    [s.prompt.record for s in samples])
        if self.rl.skip_zero_variance:
            self._count_zero_variance(n_global, prompts, taken_at, zero_variance_groups(total, group_size))
        return samples, total, parts

    def _count_zero_variance(self, n_global: int, prompts: list[PromptRecord], taken_at: list[int],
                             zero: Tensor) -> None:
        """Update every prompt's run of zero-variance groups from all ranks' outcomes (each rank
        scores its own groups; one all-reduce makes the record global)."""
        outcome = torch.zeros(n_global, dtype=torch.float64)  # 0: another rank's, 1: learnable, 2: equal rewards
        index = torch.zeros(n_global, dtype=torch.float64)
        for p, t, z in zip(prompts, taken_at, zero.tolist()):
            outcome[t], index[t] = 1.0 + z, float(p.index)
        both = all_reduce_sum(torch.cat([outcome, index]))
        for o, i in zip(both[:n_global].tolist(), both[n_global:].tolist()):
            key = int(i)
            self.zero_streak[key] = self.zero_streak.get(key, 0) + 1 if o == 2.0 else 0
            if not self.zero_streak[key]:
                del self.zero_streak[key]

    def _rollout(self) -> list[Batch]:
        rl = self.rl
        t0 = time.perf_counter()
        n_global = rl.prompts_per_step
        if rl.algorithm == "rft":
            batches, stats = self._rft_rollout(n_global)
        else:
            samples, rewards, parts, stats = self._grouped_samples(n_global)
            batch = completion_batch(samples)
            t_gen = time.perf_counter()
            stats["time/generate_s"] = t_gen - t0  # sampling and scoring
            if rl.algorithm == "ppo":
                self._ppo_fields(samples, batch, rewards)
            else:
                self._grpo_fields(samples, batch, rewards)
            stats["time/logps_s"] = time.perf_counter() - t_gen  # old-policy / reference log-probs, values
            batches = self._schedule(samples, batch)
        stats["time/rollout_s"] = time.perf_counter() - t0
        if rl.skip_zero_variance:
            stats["dynamic/passed_over"] = float(self.passed_over)  # the same on every rank
            self.passed_over = 0
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

    def micro(self, samples: list[Sample], batch: Batch, index: Tensor) -> Batch:
        """The micro-batch of the samples ``index``: their sample-space tensors (S, ...) and the
        packed rows of the training forward (`rl_data.pack_rows`)."""
        packed = pack_rows([samples[i] for i in index.tolist()], self.pad_id, self.share_prompts)
        width = packed["src"].shape[1]  # the micro-batch's longest completion
        out = {k: v[index, :width] if v.dim() == 2 else v[index] for k, v in batch.items()
               if k not in ("completion_len", "truncated")}
        return {**out, **packed}

    def _in_order(self, samples: list[Sample], batch: Batch) -> list[Batch]:
        """The rollout as consecutive micro-batches of ``batch_size`` samples (for the no-grad passes)."""
        return [self.micro(samples, batch, idx) for idx in torch.arange(len(samples)).split(self.batch_size)]

    def _grpo_fields(self, samples: list[Sample], batch: Batch, rewards: Tensor) -> None:
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
        if rl.num_iterations > 1 or self.reference is not None:
            micros = self._in_order(samples, batch)
            if rl.num_iterations > 1:  # later iterations see a changed policy: keep the sampling one's log-probs
                batch["old_logps"] = self._policy_logps(micros)
            if self.reference is not None:
                batch["ref_logps"] = self.reference(micros)

    def _policy_logps(self, micros: list[Batch]) -> Tensor:
        return batched_logps(self.generator.policy, micros, self.rl.sampling.temperature, self.amp)

    @torch.no_grad()
    def _ppo_fields(self, samples: list[Sample], batch: Batch, scores: Tensor) -> None:
        """Old log-probs, reference log-probs, values, per-token rewards, GAE, (whitened) advantages."""
        rl, mask = self.rl, batch["mask"]
        micros = self._in_order(samples, batch)
        batch["old_logps"] = self._policy_logps(micros)
        ref = self.reference(micros) if self.reference is not None else None
        if ref is not None and rl.kl_penalty == "loss":
            batch["ref_logps"] = ref
        kl = kl_k1(batch["old_logps"], ref) * mask if ref is not None and rl.kl_penalty == "reward" \
            else torch.zeros_like(mask)
        values = self._values(micros) * mask  # (S, L)
        token_rewards = ppo_token_rewards(scores.float(), kl, mask, rl.kl_coef if ref is not None else 0.0)
        advantages, returns = gae(token_rewards, values, mask, rl.gamma, rl.lam)
        if rl.whiten_advantages:
            advantages = self._global_whiten(advantages, mask)
        batch.update(advantages=advantages * mask, returns=returns, old_values=values)

    def _values(self, micros: list[Batch]) -> Tensor:
        """(S, L) the critic's value of the state before each completion token."""
        model = self.value_model
        was_training = model.training
        model.eval()
        out = []
        device = next(model.parameters()).device
        try:
            for micro in micros:
                with self.amp():
                    v = model.token_rewards(micro["input_ids"].to(device), **{
                        k: t.to(device) for k, t in forward_inputs(micro).items()})  # (R, W)
                out.append(v.float().cpu().flatten()[micro["src"]])  # (s, L)
        finally:
            model.train(was_training)
        return cat_samples(out)

    def _global_whiten(self, x: Tensor, mask: Tensor) -> Tensor:
        """Whitening over the masked tokens of every rank (`rl_losses.whiten` in one process)."""
        if not self.dist.is_distributed:
            return whiten(x, mask)
        s = all_reduce_sum(torch.stack([mask.sum(), (x * mask).sum()]).double())
        mean = s[1] / s[0]
        var = all_reduce_sum((((x - mean) ** 2) * mask).sum().double()[None])[0] / (s[0] - 1).clamp(min=1)
        return ((x - mean) * torch.rsqrt(var + 1e-8)).float()

    def _schedule(self, samples: list[Sample], batch: Batch) -> list[Batch]:
        """The micro-batches of every optimizer step this rollout feeds, in order: for each pass
        (iteration / PPO epoch) a permutation of the samples (identity for the first), split into
        minibatches (one per optimizer step), each split into ``grad_accum`` micro-batches."""
        rl, n = self.rl, len(samples)
        passes = rl.ppo_epochs if rl.algorithm == "ppo" else rl.num_iterations
        minibatches = rl.num_minibatches if rl.algorithm == "ppo" else 1
        out = []
        for p in range(passes):
            g = torch.Generator().manual_seed(request_seed(self.seed, "shuffle", self.rollouts, p))
            order = torch.arange(n) if p == 0 or minibatches == 1 else torch.randperm(n, generator=g)
            for mb in order.tensor_split(minibatches):
                out += [self.micro(samples, batch, idx) for idx in mb.tensor_split(self.grad_accum)]
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
