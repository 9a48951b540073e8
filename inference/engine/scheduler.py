"""Continuous batching: which sequences run in the next model step (no torch).

Orca-style iteration-level scheduling (Yu et al., 2022) over a paged KV cache (vLLM, Kwon et
al., 2023): requests join and leave between steps. Policy, one step at a time:

1. Prefill first. Waiting sequences are admitted in FIFO order while the number of running
   sequences stays <= max_num_seqs, the tokens to compute (prompt minus prefix-cache hit) stay
   <= max_num_batched_tokens and the block manager has blocks for them. A sequence longer than
   the token budget is admitted alone (never starved); the FIFO head is never skipped.
2. Otherwise a decode step: every running sequence computes its last token. When one needs a
   new block and none is free, the newest running sequence is preempted: its blocks are freed,
   it goes back to the front of the queue and is later recomputed as a prefill of its prompt
   plus the tokens generated so far (its full blocks usually come straight back from the
   prefix cache).

3. Chunked prefill (``prefill_chunk_size`` set; Agrawal et al., 2023, "SARATHI"): while other
   sequences decode, a prefill step computes at most ``prefill_chunk_size`` prompt tokens, and
   prefill and decode steps take turns, so a long prompt arriving never stalls the streams
   already decoding for longer than one chunk. A sequence whose prompt is not fully computed yet
   stays RUNNING, skipped by decode steps, and continues in the next prefill step (before new
   admissions); it samples its first token when its last chunk is done. With nothing decoding,
   a prefill step takes up to max_num_batched_tokens, long prompts chunked at that budget.
   With ``mix_chunks`` (a runner that packs rows of any length into one forward, no padding) the
   chunk joins the decode step instead (``packed``): one forward, the weights read once.

Prefill and decode steps are never mixed, so a runner may keep a separate fast path for
decode (one token per sequence, e.g. CUDA graphs). A step is never empty while requests are
unfinished: `add` rejects any request that could not run alone in the whole pool, so the
oldest sequence can always make progress. Not thread-safe: call it from one engine thread.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from inference.engine.block_manager import BlockManager
from inference.engine.sequence import Sequence, SequenceStatus


@dataclass
class SchedulerOutput:
    """One model step. For each seq compute tokens token_ids[num_computed_tokens:], sample one."""

    seqs: list[Sequence]
    is_prefill: bool
    num_batched_tokens: int  # tokens the runner computes this step (lookahead slots not counted)
    preempted: list[Sequence] = field(default_factory=list)  # sent back to WAITING by this call
    # tokens each seq computes, token_ids[num_computed_tokens : num_computed_tokens + n]; a prefill
    # chunk that stops short of len(seq) samples nothing (see `advance_prefill`)
    num_new_tokens: list[int] = field(default_factory=list)
    packed: bool = False  # decode rows and prefill chunks in one forward (chunked prefill with mix_chunks)


class Scheduler:
    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        max_model_len: int,
        eos_token_id: int | Iterable[int] | None = None,  # one eos id or several (every one ends a sequence)
        max_num_seqs: int = 32,
        max_num_batched_tokens: int = 2048,
        enable_prefix_caching: bool = True,
        num_lookahead_slots: int = 0,
        prefill_chunk_size: int | None = None,
        mix_chunks: bool = False,
    ) -> None:
        if prefill_chunk_size is not None and prefill_chunk_size < 1:
            raise ValueError(f"prefill_chunk_size must be >= 1 or None, got {prefill_chunk_size}")
        if max_num_seqs < 1 or max_model_len < 2 or num_lookahead_slots < 0:
            raise ValueError(
                f"need max_num_seqs >= 1, max_model_len >= 2, num_lookahead_slots >= 0; got "
                f"{max_num_seqs}, {max_model_len}, {num_lookahead_slots}"
            )
        if max_num_batched_tokens < max_num_seqs * (1 + num_lookahead_slots):
            raise ValueError(
                f"max_num_batched_tokens={max_num_batched_tokens} must be >= max_num_seqs * "
                f"(1 + num_lookahead_slots) = {max_num_seqs * (1 + num_lookahead_slots)}"
            )
        self.block_manager = BlockManager(num_blocks, block_size, enable_prefix_caching)
        self.max_model_len = max_model_len
        ids = [] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int) else eos_token_id
        self.eos_token_ids = frozenset(ids)
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.num_lookahead_slots = num_lookahead_slots
        self.prefill_chunk_size = prefill_chunk_size
        self.mix_chunks = mix_chunks
        self._last_was_prefill = False  # chunked prefill: prefill and decode steps take turns
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order: the last one is preempted first
        self._free_slots = list(range(max_num_seqs - 1, -1, -1))  # pop() hands out 0 first
        self._requests: dict[str, Sequence] = {}  # every unfinished sequence by request id

    # ---- queue state --------------------------------------------------------------------
    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def get(self, request_id: str) -> Sequence | None:
        return self._requests.get(request_id)

    @property
    def pool_len(self) -> int:
        """The longest sequence the whole KV pool holds: a sequence of final length L needs KV for
        at most L - 1 tokens (+ lookahead slots)."""
        bm = self.block_manager
        return bm.num_blocks * bm.block_size + 1 - self.num_lookahead_slots

    @property
    def max_seq_len(self) -> int:
        """The longest sequence (prompt + completion) that can ever run: max_model_len or the pool."""
        return min(self.max_model_len, self.pool_len)

    # ---- requests in and out ------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        """Queue a new sequence; ValueError (one line) if it could never run.

        Sets `seq.max_len`: prompt + max_tokens, or with max_tokens=None as long as both
        max_model_len and the whole KV pool allow.
        """
        n, max_tokens = len(seq), seq.params.max_tokens
        if seq.request_id in self._requests:
            raise ValueError(f"request id {seq.request_id!r} is already in use")
        if n == 0:
            raise ValueError("the prompt is empty")
        bm = self.block_manager
        pool_len = self.pool_len
        if max_tokens is None:
            max_len = min(self.max_model_len, pool_len)
            if n >= max_len:
                raise ValueError(f"the prompt has {n} tokens but at most {max_len - 1} fit (max_model_len / KV pool)")
        else:
            max_len = n + max_tokens
            if max_len > self.max_model_len:
                raise ValueError(
                    f"prompt ({n} tokens) + max_tokens ({max_tokens}) exceeds max_model_len={self.max_model_len}"
                )
            if max_len > pool_len:
                raise ValueError(
                    f"prompt ({n} tokens) + max_tokens ({max_tokens}) needs more KV blocks than the whole pool "
                    f"({bm.num_blocks} blocks of {bm.block_size} tokens)"
                )
        seq.max_len = max_len
        seq.status = SequenceStatus.WAITING
        self._requests[seq.request_id] = seq
        self.waiting.append(seq)

    def abort(self, request_id: str) -> Sequence | None:
        """Finish a request with reason "abort" and free everything; None if it is unknown or done."""
        seq = self._requests.get(request_id)
        if seq is not None:
            self.finish(seq, "abort")
        return seq

    def finish(self, seq: Sequence, reason: str = "stop") -> None:
        """Finish seq now (e.g. the engine found a stop string): frees its blocks and slot."""
        if seq.is_finished:
            return
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
            self.block_manager.cache_computed_blocks(seq)  # keep its KV findable (multi-turn chat)
            self.block_manager.deallocate(seq)
            self._free_slots.append(seq.slot)
            seq.slot = None
        else:
            self.waiting.remove(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        del self._requests[seq.request_id]

    # ---- one step -----------------------------------------------------------------------
    @staticmethod
    def is_prefilling(seq: Sequence) -> bool:
        """Running with prompt tokens still to compute beyond the last one (a chunked prefill)."""
        return seq.num_computed_tokens < len(seq) - 1

    def schedule(self) -> SchedulerOutput:
        """Pick the next step: a prefill batch if any waiting sequence can be admitted (or a chunked
        prefill continues), else decode; with chunked prefill the two take turns."""
        decoding = any(not self.is_prefilling(s) for s in self.running)
        if self.prefill_chunk_size is not None and self.mix_chunks and decoding:
            return self._schedule_mixed()
        if self.prefill_chunk_size is not None and self._last_was_prefill and decoding:
            self._last_was_prefill = False
            return self._schedule_decode()
        prefill = self._schedule_prefill(decoding)
        self._last_was_prefill = bool(prefill.seqs)
        if prefill.seqs:
            return prefill
        return self._schedule_decode()

    def _schedule_mixed(self) -> SchedulerOutput:
        """Every decoding sequence plus up to prefill_chunk_size prompt tokens, in one packed step
        (no admissions in a step that had to preempt)."""
        decode = self._schedule_decode()
        prefill = self._schedule_prefill(decoding=True, admit=not decode.preempted)
        return SchedulerOutput(decode.seqs + prefill.seqs, True, decode.num_batched_tokens + prefill.num_batched_tokens,
                               decode.preempted, decode.num_new_tokens + prefill.num_new_tokens, packed=True)

    def _schedule_prefill(self, decoding: bool, admit: bool = True) -> SchedulerOutput:
        bm, chunked = self.block_manager, self.prefill_chunk_size is not None
        budget = self.prefill_chunk_size if chunked and decoding else self.max_num_batched_tokens
        scheduled: list[Sequence] = []
        num_new_tokens: list[int] = []

        def take(seq: Sequence) -> None:
            remaining = len(seq) - seq.num_computed_tokens
            num_new_tokens.append(min(remaining, budget - sum(num_new_tokens)) if chunked else remaining)
            scheduled.append(seq)

        if chunked:  # chunked prompts continue first, in admission order
            for seq in self.running:
                if self.is_prefilling(seq) and sum(num_new_tokens) < budget:
                    take(seq)
        while admit and self.waiting and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            num_new = len(seq) - bm.num_hit_tokens(seq)
            if chunked and sum(num_new_tokens) >= budget:
                break
            if not chunked and scheduled and sum(num_new_tokens) + num_new > budget:
                break  # the first one is admitted even when alone it exceeds the budget
            if not bm.can_allocate(seq):
                break
            bm.allocate(seq)
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            seq.slot = self._free_slots.pop()
            self.running.append(seq)
            take(seq)
        return SchedulerOutput(scheduled, True, sum(num_new_tokens), num_new_tokens=num_new_tokens)

    def advance_prefill(self, seq: Sequence, num_tokens: int) -> None:
        """A prefill chunk of ``num_tokens`` that sampled nothing is computed: its K/V is in the pool."""
        seq.num_computed_tokens += num_tokens
        self.block_manager.cache_computed_blocks(seq)

    def _schedule_decode(self) -> SchedulerOutput:
        bm, lookahead = self.block_manager, self.num_lookahead_slots
        queue = deque(s for s in self.running if not self.is_prefilling(s))
        scheduled: list[Sequence] = []
        preempted: list[Sequence] = []
        while queue:
            seq = queue.popleft()
            while not bm.can_append(seq, lookahead):
                victim = queue.pop() if queue else seq  # the newest sequence gives way
                self._preempt(victim)
                preempted.append(victim)
                if victim is seq:
                    break
            else:
                bm.may_append(seq, lookahead)
                scheduled.append(seq)
        # a separate list (finishing mutates running, not the output); chunked prefills stay
        kept = {id(s) for s in scheduled}
        self.running = [s for s in self.running
                        if id(s) in kept or (s.status is SequenceStatus.RUNNING and self.is_prefilling(s))]
        return SchedulerOutput(scheduled, False, len(scheduled), preempted, [1] * len(scheduled))

    def _preempt(self, seq: Sequence) -> None:
        """Free seq's blocks and slot and put it first in line; it will be recomputed."""
        self.block_manager.deallocate(seq)
        self._free_slots.append(seq.slot)
        seq.slot = None
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)

    def postprocess(self, seqs: list[Sequence], token_ids: list[int] | list[list[int]]) -> list[Sequence]:
        """Append each seq's sampled token(s) (a list per seq for speculative decoding), apply
        the finishing rules, free finished sequences; returns the ones that finished.

        Token ids are Python ints. Tokens after a finishing token are dropped; the eos / stop
        token itself is kept in `output_token_ids`. Sequences finished meanwhile (aborted while
        the step ran) are skipped.
        """
        if len(seqs) != len(token_ids):
            raise ValueError(f"got {len(token_ids)} token lists for {len(seqs)} sequences")
        finished = []
        for seq, new in zip(seqs, token_ids):
            if seq.is_finished:
                continue
            reason = None
            for token_id in new if isinstance(new, (list, tuple)) else [new]:
                seq.append_token(token_id)
                reason = self._finish_reason(seq, token_id)
                if reason is not None:
                    break
            seq.num_computed_tokens = len(seq) - 1  # every token but the newest has KV now
            if reason is not None:
                self.finish(seq, reason)
                finished.append(seq)
            else:
                self.block_manager.cache_computed_blocks(seq)
        return finished

    def _finish_reason(self, seq: Sequence, token_id: int) -> str | None:
        params = seq.params
        if token_id in self.eos_token_ids and not params.ignore_eos:
            return "stop"
        if token_id in params.stop_token_ids:
            return "stop"
        if len(seq) >= seq.max_len:  # max_tokens, max_model_len or the pool size
            return "length"
        return None
