"""The generation engine: requests in, streamed tokens and text out, one `step()` at a time.

`LLMEngine` ties the pieces together (the nano-vllm / vLLM split; Kwon et al., 2023):
`Scheduler` (continuous batching, Yu et al., 2022 "Orca"; block manager with prefix caching)
decides what runs; `ModelRunner` runs the model over the paged KV cache; `sample` draws the
tokens; an optional `SpeculativeDecoder` proposes tokens with a draft model. Each step returns
a `StepOutput` per sequence that advanced: its new token ids, the new text (incremental
detokenization, Hugging Face tokenizers), logprobs and whether it finished.

Stop strings follow OpenAI's semantics: the text ends before the first stop string and the
finish reason is "stop". Text that could still turn into a stop string is held back until it
cannot. The eos token, or a stop token id, that ends a sequence is in its token ids but not in
its text; every eos id of the model counts (`eos_token_ids`). Conversations become prompts
through the model's `ChatFormat` (`encode_chat`): ChatML for models trained here, an imported
model's own chat template otherwise. Not thread-safe: one thread owns an engine (see
`inference/serving/async_engine.py`).
"""
from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch
from tokenizers import Tokenizer

from inference.engine.compiled_decode import CompiledDecode
from inference.engine.loading import LoadedModel, load_model
from inference.engine.model_runner import ModelRunner, Row
from inference.engine.optimize import check_quantize, optimize_for_inference
from inference.engine.paged_cache import (
    PagedKVCache,
    default_kv_cache_bytes,
    kv_bytes_per_token,
    num_blocks_for_budget,
    recurrent_layers,
)
from inference.engine.sampling import SamplingParams, make_generator, sample, with_generation_defaults
from inference.engine.scheduler import Scheduler
from inference.engine.sequence import Sequence
from inference.engine.speculative import LogprobEntry, SpeculativeDecoder
from inference.engine.text import IncrementalDetokenizer, encode_text, find_stop, partial_stop_len
from model.config import ModelConfig
from utils.device import pick_device, pick_dtype
from utils.errors import UserError

log = logging.getLogger(__name__)


@dataclass
class StepOutput:
    """What one request gained in one engine step."""

    request_id: str
    new_token_ids: list[int]
    new_text: str
    finished: bool
    finish_reason: Optional[str]  # "stop" | "length" | "abort" | None
    logprobs: Optional[list[LogprobEntry]]  # (token, logprob, top alternatives) per new token; None if not asked
    prompt_tokens: int
    completion_tokens: int


def _plain_greedy(params: SamplingParams) -> bool:
    """Greedy without penalties or logprobs: the token is the argmax of the raw logits."""
    no_penalty = params.repetition_penalty == 1 and not params.presence_penalty and not params.frequency_penalty
    return params.greedy and no_penalty and params.logprobs is None


class _Request:
    """Engine-side state of one request besides its `Sequence`."""

    def __init__(self, seq: Sequence, tokenizer: Optional[Tokenizer], generator: Optional[torch.Generator]) -> None:
        self.seq = seq
        self.generator = generator
        self.detokenize = IncrementalDetokenizer(tokenizer, len(seq)) if tokenizer is not None else None
        self.text = ""  # output text so far, cut before a stop string
        self.emitted = 0  # characters of text already returned


class LLMEngine:
    """Continuous-batching generation over a paged KV cache (see the module docstring).

    ``checkpoint``: one of our checkpoint directories or a Hugging Face one, or a `LoadedModel`
    already in memory (RL rollouts pass the live policy: the engine shares its weights, so an
    optimizer step is seen by the next generation; call `reset_prefix_cache` after one);
    ``adapter``: a LoRA adapter directory merged into the weights. ``kv_cache_memory_mb``: the KV pool's budget in
    MiB (target and draft together); by default half the free GPU memory on CUDA and 256 MiB on
    CPU / MPS, never more than ``max_num_seqs`` sequences of ``max_model_len`` tokens can use
    (linear attention has no KV pool). ``draft_checkpoint``: a smaller model with the same
    tokenizer for speculative decoding with ``num_speculative_tokens`` drafts per step.
    ``prefill_chunk_size``: while other sequences decode, a prompt is computed at most this many
    tokens per step, in turns with decode steps (chunked prefill; None: whole prompts at once).
    ``quantize="int8"``: weight-only int8 on the CPU; ``optimize``: the load-time rewrites of
    `inference.engine.optimize` (one matmul for q/k/v and one for gate/up; on the CPU, linear
    weights stored transposed), for models loaded from disk only.
    """

    def __init__(
        self,
        checkpoint: Union[str, Path, LoadedModel],
        adapter: Optional[Union[str, Path]] = None,
        device: Union[str, torch.device] = "auto",
        dtype: Union[str, torch.dtype] = "auto",
        block_size: int = 16,
        kv_cache_memory_mb: Optional[float] = None,
        max_num_seqs: int = 32,
        max_num_batched_tokens: int = 2048,
        prefill_chunk_size: Optional[int] = None,
        enable_prefix_caching: bool = True,
        draft_checkpoint: Optional[Union[str, Path]] = None,
        num_speculative_tokens: int = 4,
        quantize: Optional[str] = None,
        optimize: bool = True,
        compile: bool = False,
    ) -> None:
        if isinstance(checkpoint, LoadedModel):
            if adapter is not None or quantize is not None or compile:
                raise ValueError("an in-memory model takes no adapter directory, no quantization and no compile "
                                 "(frozen weights): its weights are shared as they are")
            loaded = checkpoint
            param = next(loaded.model.parameters())
            self.device, self.dtype = param.device, param.dtype
        else:
            self.device = pick_device(device)
            self.dtype = pick_dtype(dtype, self.device)
            loaded = load_model(checkpoint, self.device, self.dtype, adapter)
            check_quantize(quantize, loaded.config, self.device)
            optimize_for_inference(loaded.model, quantize, optimize)
        self.model, self.config = loaded.model, loaded.config
        self.tokenizer: Optional[Tokenizer] = loaded.tokenizer
        self._tokenizer_file = loaded.tokenizer_file
        self._chat_format = None
        self.eos_token_id = loaded.eos_token_id  # the main one
        self.eos_token_ids: tuple[int, ...] = loaded.eos_token_ids  # every id that ends a sequence
        self.generation_defaults: dict[str, float] = dict(loaded.generation_defaults)
        self.max_model_len = self.config.max_seq_len
        if block_size < 1 or max_num_seqs < 1:
            raise ValueError(f"block_size and max_num_seqs must be >= 1, got {block_size} and {max_num_seqs}")

        if draft_checkpoint is not None and num_speculative_tokens < 1:
            raise ValueError(f"num_speculative_tokens must be >= 1, got {num_speculative_tokens}")
        recurrent = recurrent_layers(self.config)
        if recurrent and enable_prefix_caching:
            log.info("prefix caching is off: %s keep their state outside the KV blocks", recurrent)
            enable_prefix_caching = False
        draft = None
        if draft_checkpoint is not None:
            if recurrent:
                raise UserError(f"speculative decoding needs a KV-cache model; {recurrent} cannot roll back "
                                "rejected drafts")
            draft = load_model(draft_checkpoint, self.device, self.dtype)
            check_quantize(quantize, draft.config, self.device)
            optimize_for_inference(draft.model, quantize, optimize)
            if draft.config.vocab_size != self.config.vocab_size:
                raise UserError(f"the draft model's vocabulary ({draft.config.vocab_size}) differs from the "
                                f"target's ({self.config.vocab_size}): it must use the same tokenizer")
            draft_recurrent = recurrent_layers(draft.config)
            if draft_recurrent:
                raise UserError(f"the draft model has {draft_recurrent}, which cannot roll back rejected drafts")
        lookahead = num_speculative_tokens if draft is not None else 0

        num_blocks = self._num_blocks(kv_cache_memory_mb, block_size, max_num_seqs, lookahead,
                                      draft.config if draft is not None else None)
        # a chunk can join the decode rows in one packed forward where every layer keeps its K/V in the pool
        packable = draft is None and self.config.attention_type == "mha" and all(
            self.config.layer_type(i) in ("full", "sliding") for i in range(self.config.n_layers))
        self.scheduler = Scheduler(num_blocks, block_size, self.max_model_len, self.eos_token_ids, max_num_seqs,
                                   max_num_batched_tokens, enable_prefix_caching, lookahead, prefill_chunk_size,
                                   mix_chunks=packable)
        self.cache = PagedKVCache(self.config, num_blocks, block_size, max_num_seqs, self.device, self.dtype)
        self.runner = ModelRunner(self.model, self.cache, self._compiled(self.model, self.cache, compile))
        self.speculative: Optional[SpeculativeDecoder] = None
        if draft is not None:
            draft_cache = PagedKVCache(draft.config, num_blocks, block_size, max_num_seqs, self.device, self.dtype)
            draft_runner = ModelRunner(draft.model, draft_cache, self._compiled(draft.model, draft_cache, compile))
            self.speculative = SpeculativeDecoder(draft_runner, num_speculative_tokens)
        self._requests: dict[str, _Request] = {}
        self._ids = itertools.count()

    def _compiled(self, model: torch.nn.Module, cache: PagedKVCache, compile: bool) -> Optional[CompiledDecode]:
        """The compiled decode step of ``model`` when ``compile`` is on and it applies (else a warning)."""
        if not compile:
            return None
        why = CompiledDecode.applies_to(model, cache)
        if why is not None:
            log.warning("compiled decoding is off (running eager): %s", why)
            return None
        return CompiledDecode(model, cache, self.max_model_len + self.scheduler.num_lookahead_slots)

    def _num_blocks(self, memory_mb: Optional[float], block_size: int, max_num_seqs: int, lookahead: int,
                    draft_config: Optional[ModelConfig]) -> int:
        """Blocks that fit the budget in MiB (target and draft pools together). Without one: the
        device default (`default_kv_cache_bytes`), but no more than max_num_seqs sequences of
        max_model_len can use."""
        per_token = kv_bytes_per_token(self.config, self.dtype)
        if draft_config is not None:
            per_token += kv_bytes_per_token(draft_config, self.dtype)
        useful = max_num_seqs * -(-(self.max_model_len + lookahead) // block_size)
        if per_token == 0:  # linear attention: blocks are bookkeeping only
            return useful
        if memory_mb is None:
            return max(1, min(useful, num_blocks_for_budget(default_kv_cache_bytes(self.device), per_token,
                                                            block_size)))
        num_blocks = num_blocks_for_budget(int(memory_mb * 2**20), per_token, block_size)
        if num_blocks < 1:
            raise UserError(f"kv_cache_memory_mb={memory_mb} holds no block of {block_size} tokens "
                            f"({per_token * block_size} bytes each)")
        return num_blocks

    # ------------------------------------------------------------------ public state
    @property
    def num_free_blocks(self) -> int:
        return self.scheduler.block_manager.num_free_blocks

    @property
    def num_total_blocks(self) -> int:
        return self.scheduler.block_manager.num_blocks

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix block (vLLM's name): needed after the weights changed, as
        their K/V were computed by the old weights. Only between requests (none running)."""
        if self.scheduler.has_unfinished():
            raise RuntimeError("reset_prefix_cache() with requests still running")
        self.scheduler.block_manager.reset_prefix_cache()

    @property
    def max_seq_len(self) -> int:
        """The longest prompt + completion one request can have: max_model_len or the whole KV pool."""
        return self.scheduler.max_seq_len

    @property
    def chat_format(self):
        """The model's `data_pipeline.chat.ChatFormat` (UserError without a tokenizer.json)."""
        from data_pipeline.chat import ChatFormat

        if self._chat_format is None:
            if self._tokenizer_file is None:
                raise UserError("this checkpoint has no tokenizer.json: chat needs one")
            self._chat_format = ChatFormat(self._tokenizer_file)
        return self._chat_format

    def encode_chat(self, messages: list[dict[str, str]], template_kwargs: Optional[dict[str, object]] = None
                    ) -> list[int]:
        """Prompt ids of a conversation in the model's chat template, ending with the assistant
        header; ``template_kwargs`` reach a Jinja template (e.g. ``{"enable_thinking": False}``).
        ValueError when the template refuses the conversation, UserError when the model has none."""
        return self.chat_format.encode_prompt(messages, template_kwargs)

    @property
    def chat_stop_token_ids(self) -> list[int]:
        """Token ids that end an assistant turn besides the eos ids (ChatML's <|im_end|>)."""
        return self.chat_format.stop_token_ids

    def sampling_params(self, **fields: object) -> SamplingParams:
        """SamplingParams where unset sampling fields take the model's generation_config.json defaults."""
        return with_generation_defaults(self.generation_defaults, **fields)

    # ------------------------------------------------------------------ requests
    def add_request(
        self, prompt: Union[str, list[int]], params: Optional[SamplingParams] = None, request_id: Optional[str] = None
    ) -> str:
        """Queue a prompt (text, encoded by `encode_text`, or token ids); returns its request id.
        ValueError (one line) if it can never run (empty, too long for max_model_len or the KV pool,
        token ids out of range)."""
        params = params if params is not None else SamplingParams()
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this checkpoint has no tokenizer.json: give the prompt as token ids")
            token_ids = encode_text(self.tokenizer, prompt)
        else:
            token_ids = [int(t) for t in prompt]
        vocab = self.config.vocab_size
        if any(not 0 <= t < vocab for t in token_ids):
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer (this checkpoint has no tokenizer.json)")
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        seq = Sequence(request_id, token_ids, params)
        self.scheduler.add(seq)
        self._requests[request_id] = _Request(seq, self.tokenizer, make_generator(params.seed, self.device))
        return request_id

    def abort(self, request_id: str) -> None:
        """Stop a request now and free its blocks (unknown or finished ids are ignored)."""
        self.scheduler.abort(request_id)
        self._forget(request_id)

    def _forget(self, request_id: str) -> None:
        self._requests.pop(request_id, None)
        if self.speculative is not None:
            self.speculative.forget(request_id)

    # ------------------------------------------------------------------ one step
    def step(self) -> list[StepOutput]:
        """Run one scheduled batch (a prefill or a decode step); outputs of the sequences that advanced."""
        out = self.scheduler.schedule()
        if not out.seqs:
            return []
        seqs = out.seqs
        if self.speculative is not None and not out.is_prefill:
            generators = [self._requests[s.request_id].generator for s in seqs]
            new_tokens, entries = self.speculative.decode(seqs, self.runner, generators)
        else:
            seqs, new_tokens, entries = self._sample_step(seqs, out.num_new_tokens, out.is_prefill, out.packed)
        lengths = [len(s) for s in seqs]
        self.scheduler.postprocess(seqs, new_tokens)
        outputs = []
        for seq, before, lps in zip(seqs, lengths, entries):
            request = self._requests.get(seq.request_id)
            if request is None:
                continue
            appended = seq.token_ids[before:]
            outputs.append(self._output(request, appended, lps[: len(appended)] if lps is not None else None))
        return outputs

    def _sample_step(
        self, seqs: list[Sequence], num_new_tokens: list[int], is_prefill: bool, packed: bool = False
    ) -> tuple[list[Sequence], list[int], list[Optional[list[LogprobEntry]]]]:
        """One forward over the scheduled rows, then one token for every row that reaches the end of
        its sequence: (those sequences, their tokens, logprob entries). A prefill chunk that stops
        short only advances (chunked prefill); ``packed``: the rows share one unpadded forward."""
        rows = [Row(s.token_ids[s.num_computed_tokens : s.num_computed_tokens + n], s.num_computed_tokens,
                    s.block_table, s.slot) for s, n in zip(seqs, num_new_tokens)]
        logits = self.runner.forward(rows, packed=packed)  # (B, V)
        if is_prefill and self.speculative is not None:
            self.speculative.prefill(seqs, rows)
        ends = [r.start + len(r.token_ids) == len(s) for s, r in zip(seqs, rows)]
        if not all(ends):
            for seq, row, end in zip(seqs, rows, ends):
                if not end:
                    self.scheduler.advance_prefill(seq, len(row.token_ids))
            keep = [b for b, end in enumerate(ends) if end]
            seqs, logits = [seqs[b] for b in keep], logits[keep]
        generators = [self._requests[s.request_id].generator for s in seqs]
        if all(_plain_greedy(s.params) for s in seqs):  # what `sample` returns then, minus its overhead
            return seqs, logits.argmax(dim=-1).tolist(), [None] * len(seqs)
        result = sample(logits, [s.params for s in seqs], [s.token_ids for s in seqs], generators,
                        [s.num_prompt_tokens for s in seqs])
        tokens = result.token_ids.tolist()
        entries: list[Optional[list[LogprobEntry]]] = [None] * len(seqs)
        if any(s.params.logprobs is not None for s in seqs):
            chosen = result.logprobs.tolist()
            for b, s in enumerate(seqs):
                if s.params.logprobs is not None:
                    top = result.top_logprobs[b] if result.top_logprobs is not None else []
                    entries[b] = [(tokens[b], chosen[b], top)]
        return seqs, tokens, entries

    def _output(self, request: _Request, appended: list[int], lps: Optional[list[LogprobEntry]]) -> StepOutput:
        """Detokenize, apply stop strings, build the StepOutput; drop the request when it is done."""
        seq = request.seq
        finished = seq.is_finished
        new_text = ""
        if request.detokenize is not None:
            ids = seq.token_ids
            stops = seq.params.stop
            if finished and seq.finish_reason == "stop" and self._is_stop_token(seq, ids[-1]):
                ids = ids[:-1]  # the eos / stop token is not part of the text
            searched = len(request.text)
            request.text += request.detokenize(ids, final=finished)
            if stops:
                hit = find_stop(request.text, stops, max(0, searched - max(map(len, stops)) + 1))
                if hit >= 0:
                    request.text = request.text[:hit]
                    if finished:
                        seq.finish_reason = "stop"  # it also hit a length limit in this step
                    else:
                        self.scheduler.finish(seq, "stop")
                        finished = True
            end = len(request.text)
            if stops and not finished:
                end -= partial_stop_len(request.text, stops)
            new_text = request.text[request.emitted : end]
            request.emitted = max(request.emitted, end)
        if finished:
            self._forget(seq.request_id)
        logprobs = lps if seq.params.logprobs is not None else None
        return StepOutput(seq.request_id, appended, new_text, finished, seq.finish_reason if finished else None,
                          logprobs, seq.num_prompt_tokens, seq.num_completion_tokens)

    def _is_stop_token(self, seq: Sequence, token_id: int) -> bool:
        eos = token_id in self.scheduler.eos_token_ids and not seq.params.ignore_eos
        return eos or token_id in seq.params.stop_token_ids
