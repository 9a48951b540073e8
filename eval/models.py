"""Our model as an evaluation backend: batched log-likelihoods and generation through the one engine.

`LocalLM` answers the three request kinds of `eval.requests` the way lm-evaluation-harness's ``hf``
backend (``HFLM``) does, so that numbers agree with it:

- tokenization: ``tokenizer.encode(text)`` with the tokenizer's own special tokens (a BOS where
  its post-processor adds one); a (context, continuation) pair moves the context's trailing
  spaces to the continuation and splits ``encode(context + continuation)`` after the context's
  tokens (``_encode_pair``); an empty context is the prefix token (BOS, else EOS).
- log-likelihoods: the input is ``(context + continuation)[-(max_length + 1):][:-1]``; the answer
  is the sum of the continuation tokens' log-softmax and whether each was the argmax.
- rolling log-likelihoods: `eval.requests.rolling_windows` (lm-eval's windows; a smaller stride
  adds context), every window a log-likelihood request.
- generation: the paged engine (`inference.engine`, continuous batching, stop strings); the
  prompt is left-truncated to ``max_length - max_gen_toks`` tokens as lm-eval does.

Batching (what makes it faster than one forward per request): requests whose input rows are
equal share one row (MMLU's four answers are one forward); rows are sorted lexicographically and
runs of neighbours that share a long prefix are batched together (`_batches`); such a batch runs
the shared prefix once (batch 1) into a KV cache, copies it to every row and runs only the rows'
suffixes (MMLU's description and five shots). Rows that share nothing are batched longest first,
as lm-eval does. Logits are computed only at the scored positions (``keep``).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from eval.requests import GenerateUntil, Loglikelihood, LoglikelihoodRolling, Messages, rolling_windows
from inference.engine.loading import load_model
from model.cache import ContiguousLayerCache
from utils.device import pick_device, pick_dtype
from utils.errors import UserError

MIN_SHARED_PREFIX = 16  # tokens: shorter shared prefixes are not worth a second forward
Progress = Callable[[int], None]  # called with how many requests just finished


def _noop(_: int) -> None:
    pass


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _special_token(path: Path, name: str) -> Optional[str]:
    """The text of ``bos_token`` / ``eos_token`` in the directory's tokenizer_config.json, if any."""
    file = path / "tokenizer_config.json"
    if not file.is_file():
        return None
    try:
        value = json.loads(file.read_text()).get(name)
    except (OSError, json.JSONDecodeError):
        return None
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


class LocalLM:
    """A checkpoint (ours or a Hugging Face directory, + a LoRA adapter) in this process."""

    def __init__(self, checkpoint: Union[str, Path], adapter: Optional[Union[str, Path]] = None,
                 device: str = "auto", dtype: str = "auto", batch_size: int = 16,
                 kv_cache_memory_mb: Optional[float] = None) -> None:
        self.path = Path(checkpoint)
        self.adapter = Path(adapter) if adapter is not None else None
        self.device = pick_device(device)
        self.dtype = pick_dtype(dtype, self.device)
        self.loaded = load_model(self.path, self.device, self.dtype, self.adapter)
        if self.loaded.tokenizer is None:
            raise UserError(f"{self.path} has no tokenizer.json: evaluation needs the model's tokenizer")
        self.model = self.loaded.model
        self.tokenizer = self.loaded.tokenizer
        self.max_length = self.loaded.config.max_seq_len
        self.batch_size = batch_size
        self.kv_cache_memory_mb = kv_cache_memory_mb
        self.prefix_token_id = self._prefix_token_id()
        self._engine = None  # built on the first generation request
        self._chat = None

    # ------------------------------------------------------------------ description
    @property
    def name(self) -> str:
        return self.path.resolve().name

    def describe(self) -> dict:
        cfg = self.loaded.config
        return {
            "backend": "local", "checkpoint": str(self.path.resolve()),
            "adapter": str(self.adapter.resolve()) if self.adapter else None,
            "family": cfg.family, "n_layers": cfg.n_layers, "dim": cfg.dim, "vocab_size": cfg.vocab_size,
            "parameters": sum(p.numel() for p in self.model.parameters()), "max_length": self.max_length,
            "device": str(self.device), "dtype": str(self.dtype).removeprefix("torch."),
            "tokenizer_file": str(self.loaded.tokenizer_file),
        }

    def _prefix_token_id(self) -> int:
        """lm-eval's prefix token: the tokenizer's BOS, else its EOS."""
        for name in ("bos_token", "eos_token"):
            text = _special_token(self.path, name)
            token_id = self.tokenizer.token_to_id(text) if text else None
            if token_id is not None:
                return token_id
        if self.loaded.eos_token_id is None:
            raise UserError(f"{self.path}: the tokenizer has no BOS or EOS token to start a text with")
        return self.loaded.eos_token_id

    # ------------------------------------------------------------------ tokenization
    def tok_encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=True).ids

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """lm-eval's ``loglikelihood`` tokenization of one (context, continuation) pair."""
        if context == "":
            cont = self.tokenizer.encode(continuation, add_special_tokens=False).ids
            return ([self.prefix_token_id], cont) if cont[:1] != [self.prefix_token_id] else (cont[:1], cont[1:])
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
        whole = self.tok_encode(context + continuation)
        ctx = self.tok_encode(context)
        return ctx, whole[len(ctx):]

    def chat_text(self, messages: Messages) -> str:
        """The chat-template prompt of `messages` (ending with the assistant header) as text."""
        return self.tokenizer.decode(self.encode_chat(messages), skip_special_tokens=False)

    def encode_chat(self, messages: Messages) -> list[int]:
        """Prompt ids of `messages` in the model's chat template (ChatML for models trained here, an
        imported model's own template otherwise), ending with the assistant header."""
        from data_pipeline.chat import ChatFormat

        if self._chat is None:
            self._chat = ChatFormat(self.loaded.tokenizer_file)
        return self._chat.encode_prompt(messages)

    # ------------------------------------------------------------------ log-likelihoods
    def loglikelihood(self, requests: Sequence[Loglikelihood], progress: Progress = _noop) -> list[tuple[float, bool]]:
        pairs = [self.encode_pair(r.context, r.continuation) for r in requests]
        return self.loglikelihood_tokens(pairs, progress)

    def loglikelihood_rolling(self, requests: Sequence[LoglikelihoodRolling], stride: Optional[int] = None,
                              progress: Progress = _noop) -> list[tuple[float, int]]:
        """(log-likelihood of the whole text, tokens scored) per request."""
        pairs: list[tuple[list[int], list[int]]] = []
        owner: list[int] = []
        counts: list[int] = []
        for i, r in enumerate(requests):
            tokens = list(r.token_ids) if r.token_ids is not None else self.tok_encode(r.text or "")
            counts.append(len(tokens))
            for window in rolling_windows(tokens, self.prefix_token_id, self.max_length, stride):
                pairs.append(window)
                owner.append(i)
        remaining = [0] * len(requests)
        for i in owner:
            remaining[i] += 1
        progress(remaining.count(0))  # empty texts: nothing to score
        totals = [0.0] * len(requests)

        def window_done(done: Sequence[int]) -> None:
            for j in done:
                remaining[owner[j]] -= 1
                if remaining[owner[j]] == 0:
                    progress(1)

        lls = self.loglikelihood_tokens(pairs, on_done=window_done)
        for j, (ll, _) in enumerate(lls):
            totals[owner[j]] += ll
        return list(zip(totals, counts))

    @torch.inference_mode()
    def loglikelihood_tokens(self, pairs: Sequence[tuple[list[int], list[int]]], progress: Progress = _noop,
                             on_done: Optional[Callable[[Sequence[int]], None]] = None) -> list[tuple[float, bool]]:
        """(sum of log P(continuation tokens), all greedy) per (context ids, continuation ids) pair."""
        rows: dict[tuple[int, ...], list[int]] = {}  # input row -> the requests it answers
        targets: list[list[int]] = []
        for j, (ctx, cont) in enumerate(pairs):
            if not cont:
                raise UserError("a log-likelihood request has an empty continuation")
            if len(cont) > self.max_length:
                raise UserError(f"a continuation of {len(cont)} tokens is longer than the model's "
                                f"{self.max_length} positions")
            row = tuple((ctx + cont)[-(self.max_length + 1):][:-1])
            rows.setdefault(row, []).append(j)
            targets.append(cont)
        results: list[tuple[float, bool]] = [(0.0, False)] * len(pairs)
        for batch in self._batches(list(rows)):
            first = [min(len(row) - len(targets[j]) for j in rows[row]) for row in batch]
            logprobs = self._score_rows(batch, first)  # per row: (len(row) - first, V) log-probs
            done = []
            for row, lp, begin in zip(batch, logprobs, first):
                for j in rows[row]:
                    cont = torch.tensor(targets[j], device=lp.device)
                    sel = lp[len(row) - len(cont) - begin:]  # (len(cont), V)
                    ll = float(sel.gather(1, cont[:, None]).sum())
                    results[j] = (ll, bool((sel.argmax(dim=-1) == cont).all()))
                    done.append(j)
            progress(len(done))
            if on_done is not None:
                on_done(done)
        return results

    def _batches(self, rows: list[tuple[int, ...]]) -> list[list[tuple[int, ...]]]:
        """Batches of rows: runs of lexicographic neighbours that share a long prefix stay together
        (a run is cut where the prefix shared with its first row falls below half of what the run
        shares, or below `MIN_SHARED_PREFIX`); rows that share nothing go together, longest first."""
        runs: list[list[tuple[int, ...]]] = []
        shared: list[int] = []
        for row in sorted(rows):
            if runs:
                n = _common_prefix(runs[-1][0], row)
                need = MIN_SHARED_PREFIX if len(runs[-1]) == 1 else max(MIN_SHARED_PREFIX, shared[-1] // 2)
                if n >= need:
                    runs[-1].append(row)
                    shared[-1] = min(shared[-1], n)
                    continue
            runs.append([row])
            shared.append(len(row))
        lonely = sorted((r[0] for r in runs if len(r) == 1), key=len, reverse=True)
        groups = [r for r in runs if len(r) > 1] + ([lonely] if lonely else [])
        size = self.batch_size
        return [g[i:i + size] for g in groups for i in range(0, len(g), size)]

    def _score_rows(self, batch: list[tuple[int, ...]], first: list[int]) -> list[torch.Tensor]:
        """Log-softmax (float32) at positions first[i] .. len(row_i) - 1 of every row (one forward;
        with a shared prefix, a batch-1 prefill of it first)."""
        shared = min(_common_prefix(batch[0], row) for row in batch[1:]) if len(batch) > 1 else 0
        shared = min([shared] + first)  # every scored position lies after the shared prefix
        if shared < MIN_SHARED_PREFIX or not self._contiguous_cache():
            shared = 0
        cache = self._prefill(batch[0][:shared], len(batch), max(map(len, batch))) if shared else None
        suffixes = [row[shared:] for row in batch]
        width = max(map(len, suffixes))
        tokens = torch.zeros(len(batch), width, dtype=torch.long)
        keep = torch.zeros(len(batch), width, dtype=torch.bool)
        for i, (suffix, begin) in enumerate(zip(suffixes, first)):
            tokens[i, :len(suffix)] = torch.tensor(suffix)
            keep[i, begin - shared:len(suffix)] = True  # right padding is never read: attention is causal
        logits = self.model(tokens.to(self.device), cache=cache, keep=keep.to(self.device))  # (N, V)
        logprobs = F.log_softmax(logits.float(), dim=-1)
        return list(logprobs.split(keep.sum(dim=1).tolist()))

    def _contiguous_cache(self) -> bool:
        if not hasattr(self, "_contiguous"):
            probe = self.model.init_cache(1, 1, self.device, self.dtype)
            self._contiguous = all(isinstance(layer, ContiguousLayerCache) for layer in probe.layers)
        return self._contiguous

    def _prefill(self, prefix: Sequence[int], batch_size: int, max_len: int):
        """A KV cache of `batch_size` rows holding `prefix` (computed once, copied to every row)."""
        one = self.model.init_cache(1, len(prefix), self.device, self.dtype)
        self.model.forward_hidden(torch.tensor([list(prefix)], device=self.device), cache=one)
        cache = self.model.init_cache(batch_size, max_len, self.device, self.dtype)
        for src, dst in zip(one.layers, cache.layers):
            for a, b in zip(src.buffers, dst.buffers):
                b[:, :len(prefix)] = a
            dst.length = len(prefix)
        cache.length = len(prefix)
        return cache

    # ------------------------------------------------------------------ generation
    @property
    def engine(self):
        if self._engine is None:
            from inference.engine.llm_engine import LLMEngine

            self._engine = LLMEngine(self.loaded, max_num_seqs=max(self.batch_size, 1),
                                     kv_cache_memory_mb=self.kv_cache_memory_mb)
        return self._engine

    def _prompt_ids(self, request: GenerateUntil) -> tuple[list[int], list[int], int]:
        """(prompt ids left-truncated to leave room for the new tokens, stop token ids, new tokens at
        most). A max_gen_toks that leaves no room (lm-eval would stop) becomes half the length."""
        gen = request.max_gen_toks if request.max_gen_toks < self.max_length else self.max_length // 2
        room = self.max_length - gen
        if isinstance(request.context, str):
            return self.tok_encode(request.context)[-room:], [], gen
        prompt = self.encode_chat(request.context)[-room:]
        return prompt, self._chat.stop_token_ids, gen  # the end of the turn, besides the eos ids

    def generate_until(self, requests: Sequence[GenerateUntil], progress: Progress = _noop) -> list[list[str]]:
        """``request.n`` completions per request (continuous batching over all of them)."""
        from inference.engine.sampling import SamplingParams

        engine = self.engine
        owner: dict[str, tuple[int, int]] = {}
        texts: list[list[list[str]]] = [[[] for _ in range(r.n)] for r in requests]
        left = [r.n for r in requests]
        for i, r in enumerate(requests):
            ids, stop_ids, gen = self._prompt_ids(r)
            for k in range(r.n):
                seed = None if r.seed is None or r.temperature == 0 else r.seed + k
                params = SamplingParams(temperature=r.temperature, top_p=r.top_p, seed=seed, stop=list(r.until),
                                        stop_token_ids=stop_ids, max_tokens=min(gen, self.max_length - len(ids)))
                try:
                    owner[engine.add_request(ids, params)] = (i, k)
                except ValueError as e:
                    for rid in owner:
                        engine.abort(rid)
                    raise UserError(f"cannot generate for request {i}: {e}") from None
        while engine.has_unfinished():
            for out in engine.step():
                i, k = owner[out.request_id]
                texts[i][k].append(out.new_text)
                if out.finished:
                    left[i] -= 1
                    if left[i] == 0:
                        progress(1)
        return [["".join(parts) for parts in per_request] for per_request in texts]
