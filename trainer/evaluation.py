"""Periodic evaluation during training: validation loss / perplexity and sample generations.

Validation runs on every rank over that rank's shard of the validation batches; the loss
sums and target counts are all-reduced, so the result is the exact mean over all ranks'
targets (not a mean of per-rank means). Perplexity is exp(mean cross-entropy).

Sample generations decode greedily (or top-k) with the model's own KV cache
(`Transformer.init_cache`), one sequence, from a fixed prompt. They run on every rank, so a
model sharded with FSDP2 can gather its parameters, and use a private random generator,
so training's random streams — and therefore exact resume — are untouched.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, ContextManager, Iterable, Optional

import torch
from torch import nn

from data_pipeline.formats import EOS_TOKEN, IM_END
from trainer.distributed import all_reduce_sum, unwrap
from trainer.losses import Batch, LossFn
from utils.errors import UserError


def to_device(batch: Batch, device: torch.device) -> Batch:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[Batch], loss_fn: LossFn, num_batches: int,
             device: torch.device, amp: Callable[[], ContextManager]) -> dict[str, float]:
    """Validation over `num_batches` batches per rank: ``val_loss`` (the mean cross-entropy
    when the loss logs one as ``ce``, else the mean of the loss itself), ``val_ppl`` (for
    cross-entropy), and ``val_<name>`` for every other logged sum (e.g. ``val_rewards/accuracies``
    of preference training), each a mean over all ranks' targets (an objective term's own
    targets for a term's sum, e.g. ``val_mtp/1``)."""
    was_training = model.training
    model.eval()
    names: list[str] = []
    has_ce = False
    totals: Optional[torch.Tensor] = None  # (sum of the loss, sums of the logged values..., their target counts)
    for _, batch in zip(range(num_batches), batches):
        batch = to_device(batch, device)
        with amp():
            out = loss_fn(model, batch)
        if totals is None:
            names, has_ce = [k for k in out.sums if k != "ce"], "ce" in out.sums
            totals = torch.zeros(2 * (len(names) + 1), dtype=torch.float64, device=device)
        values = [out.sums.get("ce", out.loss_sum)] + [out.sums[k] for k in names]
        counts = [out.n_tokens] + [out.term_counts.get(k, out.n_tokens) for k in names]  # mtp/k: its own targets
        n = len(values)
        totals[:n] += torch.stack([v.detach().double().reshape(()) for v in values])
        totals[n:] += torch.tensor(counts, dtype=torch.float64, device=device)
    if totals is None:
        raise UserError("validation got no batch: the validation data is empty")
    all_reduce_sum(totals)
    model.train(was_training)
    n = len(names) + 1
    means = (totals[:n] / totals[n:].clamp(min=1)).tolist()
    result = {"val_loss": means[0], "val_tokens": int(totals[n].item())}
    if has_ce or not names:  # a plain loss without logged sums is a cross-entropy too
        result["val_ppl"] = math.exp(min(means[0], 50.0))
    result.update({f"val_{k}": v for k, v in zip(names, means[1:])})
    return result


def sample_next(logits: torch.Tensor, top_k: int, generator: Optional[torch.Generator]) -> torch.Tensor:
    """logits (B, V) → next token ids (B,): argmax when top_k == 0, else top-k sampling."""
    if top_k <= 0:
        return logits.argmax(dim=-1)
    values, indices = torch.topk(logits.float(), min(top_k, logits.shape[-1]), dim=-1)  # (B, k)
    probs = torch.softmax(values, dim=-1)
    choice = torch.multinomial(probs.cpu(), 1, generator=generator).to(indices.device)  # (B, 1)
    return indices.gather(-1, choice).squeeze(-1)


@torch.no_grad()
def generate(model: nn.Module, prompt: list[int], max_new_tokens: int, top_k: int = 0,
             stop_ids: Iterable[int] = (), generator: Optional[torch.Generator] = None) -> list[int]:
    """Continue `prompt` (token ids) by up to `max_new_tokens` tokens using the KV cache."""
    base = unwrap(model)
    was_training = base.training
    base.eval()
    device = next(base.parameters()).device
    max_len = min(len(prompt) + max_new_tokens, base.cfg.max_seq_len)
    prompt = prompt[-(max_len - 1):]  # keep room for at least one new token
    cache = base.init_cache(1, max_len, device=device)
    logits = base(torch.tensor([prompt], device=device), cache=cache)[:, -1]  # (1, V)
    out: list[int] = []
    while len(prompt) + len(out) < max_len:
        token = sample_next(logits, top_k, generator)  # (1,)
        out.append(int(token.item()))
        if out[-1] in stop_ids:
            break
        logits = base(token.view(1, 1), cache=cache)[:, -1]
    base.train(was_training)
    return out


class TextSampler:
    """Decodes a fixed prompt with the run's tokenizer (``tokenizer.json``) for the log."""

    def __init__(self, tokenizer_dir: Path, prompt: str, max_new_tokens: int, top_k: int, seed: int) -> None:
        from tokenizers import Tokenizer

        path = Path(tokenizer_dir) / "tokenizer.json"
        if not path.is_file():
            raise UserError(f"sample generations (logging.sample_interval > 0) need {path}; "
                            "set logging.sample_interval=0 or point data.tokenizer_dir at a tokenizer")
        self.tokenizer = Tokenizer.from_file(str(path))
        self.prompt_ids = self.tokenizer.encode(prompt, add_special_tokens=False).ids
        if not self.prompt_ids:
            raise UserError(f"logging.sample_prompt {prompt!r} encodes to no tokens")
        self.max_new_tokens = max_new_tokens
        self.top_k = top_k
        self.seed = seed
        # a pretrained model ends a document with EOS; a chat model ends its turn with <|im_end|>
        stops = (self.tokenizer.token_to_id(EOS_TOKEN), self.tokenizer.token_to_id(IM_END))
        self.stop_ids = frozenset(i for i in stops if i is not None)

    def __call__(self, model: nn.Module, step: int, amp: Callable[[], ContextManager]) -> str:
        generator = torch.Generator().manual_seed(self.seed + step)
        with amp():
            ids = generate(model, self.prompt_ids, self.max_new_tokens, self.top_k, self.stop_ids, generator)
        return self.tokenizer.decode(self.prompt_ids + ids, skip_special_tokens=False)
