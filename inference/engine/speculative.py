"""Speculative decoding with a small draft model (Leviathan et al., 2023; Chen et al., 2023).

Each decode step, for every running sequence: the draft model proposes k tokens
d_1..d_k one at a time (drawn from its own distributions q_i, processed with the request's
sampling parameters); the target model scores the last token and all k drafts in ONE forward,
giving p_1..p_{k+1}; then `verify_draft` keeps d_i with probability min(1, p_i(d_i) / q_i(d_i)),
replaces the first rejected one by a draw from norm(max(0, p_i - q_i)), and when all k are
kept adds a bonus token from p_{k+1}. Every emitted token is then distributed exactly as
target-only sampling would have drawn it (the papers' theorem); with temperature 0 both
distributions are one-hot and the output equals target-only greedy decoding.

The draft keeps its own paged cache with the same block size and number of blocks as the
target's, indexed by the same block tables (the scheduler reserves ``k`` lookahead slots for
the drafts' K/V). It computes what the target computes, except that after a step in which all
k drafts were accepted its K/V lags one token behind (d_k was never fed to it); the next step
catches up (a 2-token first draft forward). A block shared through the prefix cache may thus
miss the draft's entry for its last position: that can only lower the acceptance rate, never
change the output, whose distribution does not depend on the draft. Linear-attention models
cannot roll their recurrent state back over rejected drafts and are not supported.
"""
from __future__ import annotations

from typing import Optional

import torch

from inference.engine.model_runner import ModelRunner, Row
from inference.engine.sampling import (
    SamplingParams,
    _penalty_inputs,
    apply_penalties,
    top_k_top_p_min_p_mask,
)
from inference.engine.sequence import Sequence

LogprobEntry = tuple[int, float, list[tuple[int, float]]]  # (token, logprob, top alternatives)


def sampling_distributions(
    logits: torch.Tensor,  # (N, V)
    params: list[SamplingParams],
    histories: list[list[int]],
    prompt_lens: list[int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """The distributions `sampling.sample` draws from, and the log-probabilities it reports.

    Same processing: penalties, then one-hot argmax for greedy rows, else temperature, top-k,
    top-p, min-p. Returns (probs (N, V), logprobs (N, V)), both float32; logprobs are
    log_softmax(penalised logits / temperature) (temperature 1 for greedy rows).
    """
    device = logits.device
    logits = logits.float()

    def column(values: list[float]) -> torch.Tensor:  # (N, 1)
        return torch.tensor(values, dtype=torch.float32, device=device).unsqueeze(-1)

    if any(p.repetition_penalty != 1 or p.presence_penalty or p.frequency_penalty for p in params):
        seen, counts = _penalty_inputs(histories, prompt_lens, logits.shape, device)
        logits = apply_penalties(
            logits, seen, counts, column([p.repetition_penalty for p in params]),
            column([p.presence_penalty for p in params]), column([p.frequency_penalty for p in params]),
        )
    logits = logits / column([1.0 if p.greedy else p.temperature for p in params])
    logprobs = logits.log_softmax(dim=-1)  # (N, V)
    if any(p.top_k or p.top_p < 1 or p.min_p for p in params):
        removed = top_k_top_p_min_p_mask(
            logits, torch.tensor([min(p.top_k, logits.shape[-1]) for p in params], dtype=torch.long, device=device),
            column([p.top_p for p in params]), column([p.min_p for p in params]),
        )
        logits = logits.masked_fill(removed, float("-inf"))
    probs = logits.softmax(dim=-1)  # (N, V)
    greedy = torch.tensor([p.greedy for p in params], device=device)
    if greedy.any():
        one_hot = torch.zeros_like(probs).scatter_(-1, logits.argmax(dim=-1, keepdim=True), 1.0)
        probs = torch.where(greedy[:, None], one_hot, probs)
    return probs, logprobs


def draw(probs: torch.Tensor, generator: Optional[torch.Generator]) -> int:
    """One token from a distribution (V,) (need not be normalised)."""
    return int(torch.multinomial(probs, 1, generator=generator))


def verify_draft(
    target_probs: torch.Tensor,  # (k + 1, V): p_1 .. p_{k+1}
    draft_probs: torch.Tensor,  # (k, V): q_1 .. q_k
    draft_tokens: list[int],  # d_1 .. d_k, d_i drawn from q_i
    generator: Optional[torch.Generator] = None,
) -> list[int]:
    """Speculative sampling's accept / reject (Leviathan et al. 2023, Alg. 1): the accepted
    drafts followed by one token from the target (the correction or the bonus)."""
    k = len(draft_tokens)
    idx = torch.arange(k, device=target_probs.device)
    tokens = torch.tensor(draft_tokens, device=target_probs.device)
    p, q = target_probs[idx, tokens], draft_probs[idx, tokens]  # (k,), (k,)
    u = torch.rand(k, generator=generator, device=target_probs.device)
    accepted = u * q < p  # probability min(1, p / q)
    n = int(accepted.long().cumprod(0).sum())  # leading accepted drafts
    if n == k:
        return draft_tokens + [draw(target_probs[k], generator)]
    residual = (target_probs[n] - draft_probs[n]).clamp_min(0)
    if residual.sum() <= 0:  # p == q exactly: a rejection cannot happen in exact arithmetic
        residual = target_probs[n]
    return draft_tokens[:n] + [draw(residual, generator)]


class SpeculativeDecoder:
    """Runs the draft model and the verification for the decode steps of an `LLMEngine`."""

    def __init__(self, draft: ModelRunner, num_speculative_tokens: int) -> None:
        if num_speculative_tokens < 1:
            raise ValueError(f"num_speculative_tokens must be >= 1, got {num_speculative_tokens}")
        self.draft = draft
        self.k = num_speculative_tokens
        self.draft_computed: dict[str, int] = {}  # request id -> positions with draft K/V
        self.num_proposed = 0
        self.num_accepted = 0

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted / self.num_proposed if self.num_proposed else 0.0

    def prefill(self, seqs: list[Sequence], rows: list[Row]) -> None:
        """The draft computes what the target's prefill computed."""
        self.draft.forward(rows, logits="none")
        for seq, row in zip(seqs, rows):
            self.draft_computed[seq.request_id] = row.start + len(row.token_ids)

    def forget(self, request_id: str) -> None:
        self.draft_computed.pop(request_id, None)

    def decode(
        self,
        seqs: list[Sequence],
        target: ModelRunner,
        generators: list[Optional[torch.Generator]],
    ) -> tuple[list[list[int]], list[list[LogprobEntry]]]:
        """One speculative step: per sequence the new tokens (accepted drafts + one) and their
        (token, logprob, top alternatives) entries."""
        k = self.k
        params = [s.params for s in seqs]
        prompt_lens = [s.num_prompt_tokens for s in seqs]
        drafts: list[list[int]] = [[] for _ in seqs]
        draft_probs: list[list[torch.Tensor]] = [[] for _ in seqs]
        rows = []
        for seq in seqs:  # first forward: catch up on what the draft has not seen (1 or 2 tokens)
            done = min(self.draft_computed.get(seq.request_id, 0), len(seq) - 1)
            rows.append(Row(seq.token_ids[done:], done, seq.block_table, seq.slot))
        logits = self.draft.forward(rows)  # (B, V)
        for i in range(k):
            probs, _ = sampling_distributions(logits, params, [s.token_ids + d for s, d in zip(seqs, drafts)],
                                              prompt_lens)
            for b, (seq, gen) in enumerate(zip(seqs, generators)):
                token = int(probs[b].argmax()) if seq.params.greedy else draw(probs[b], gen)
                drafts[b].append(token)
                draft_probs[b].append(probs[b])
            if i < k - 1:
                logits = self.draft.forward([Row([d[-1]], len(s) + i, s.block_table, s.slot)
                                             for s, d in zip(seqs, drafts)])

        verify_rows = [Row([s.last_token_id] + d, len(s) - 1, s.block_table, s.slot) for s, d in zip(seqs, drafts)]
        target_logits = target.forward(verify_rows, logits="all")  # (B, k + 1, V)
        new_tokens, entries = [], []
        for b, (seq, gen) in enumerate(zip(seqs, generators)):
            history = [seq.token_ids + drafts[b][:i] for i in range(k + 1)]
            p, logp = sampling_distributions(target_logits[b], [seq.params] * (k + 1), history,
                                             [seq.num_prompt_tokens] * (k + 1))
            tokens = verify_draft(p, torch.stack(draft_probs[b]), drafts[b], gen)
            n = len(tokens) - 1
            self.num_proposed += k
            self.num_accepted += n
            self.draft_computed[seq.request_id] = len(seq) + min(n, k - 1)
            new_tokens.append(tokens)
            entries.append(logprob_entries(logp[: n + 1], tokens, seq.params.logprobs))
        return new_tokens, entries


def logprob_entries(logprobs: torch.Tensor, tokens: list[int], top: Optional[int]) -> list[LogprobEntry]:
    """(token, logprob, top-`top` alternatives) per row of ``logprobs`` (N, V); [] when ``top`` is None."""
    if top is None:
        return []
    chosen = logprobs[torch.arange(len(tokens), device=logprobs.device), torch.tensor(tokens, device=logprobs.device)]
    alternatives: list[list[tuple[int, float]]] = [[] for _ in tokens]
    if top > 0:
        values, ids = logprobs.topk(top, dim=-1)
        alternatives = [list(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]
    return [(t, lp, alt) for t, lp, alt in zip(tokens, chosen.tolist(), alternatives)]
