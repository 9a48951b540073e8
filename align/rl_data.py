"""RL prompts and rollout batches: reading the prompts file, encoding, collating.

The prompts file is JSON Lines, one ``{"prompt": str, "answer": str, ...}`` per line (what
`data_pipeline/download/download_prompts.py` writes; ``answer`` is what the verifiable reward
compares against, any other field reaches the reward functions untouched). A prompt is the
user turn of a conversation in the one chat template; ``prompt`` may also be a list of
messages ending with a user message. The file's last ``rl.val_prompts`` prompts are held out:
never trained on, they measure the held-out reward.

A rollout batch lives in *completion* space: per-sample tensors (S, L), column t being the
t-th generated token of sample s (``completion``, its ``mask``, log-probs, advantages). The
training forward's input is packed separately for each micro-batch (`pack_rows`): with
``share_prompts`` one row per prompt, the prompt once and then each of its completions as a
document that sees the prompt (`model.positions.SHARED_PREFIX`); otherwise one right-padded
``prompt + completion`` row per sample. ``src`` (S, L) names the position of the packed rows
whose hidden state predicts each completion token, so both layouts give the same log-probs.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import torch

from data_pipeline.chat import ChatTokenizer, check_messages, encode_prompt
from data_pipeline.download.sources import iter_jsonl
from data_pipeline.loader import IGNORE_INDEX
from model.positions import SHARED_PREFIX
from utils.errors import UserError

logger = logging.getLogger(__name__)
Prompt = Union[str, list[dict[str, str]]]


@dataclass
class PromptRecord:
    """One RL prompt: its record (for the rewards), its text (or messages) and its token ids."""

    index: int  # line order in the file (0-based, blank lines skipped)
    record: dict[str, Any]
    ids: list[int]

    @property
    def prompt(self) -> Prompt:
        return self.record["prompt"]


def read_prompts(path: Path) -> list[dict[str, Any]]:
    """The records of a prompts file; a `UserError` naming the line for anything malformed."""
    records = []
    missing = f"RL prompts file not found: {path} (write one with python data_pipeline/download/download_prompts.py)"
    for lineno, rec in iter_jsonl(path, missing):
        if not isinstance(rec, dict):
            raise UserError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}")
        prompt = rec.get("prompt")
        if isinstance(prompt, list):
            try:
                check_messages(prompt, last_role="user")
            except (UserError, ValueError) as e:
                raise UserError(f"{path}:{lineno}: bad prompt messages ({e})") from None
        elif not isinstance(prompt, str) or not prompt.strip():
            raise UserError(f"{path}:{lineno}: needs a non-empty \"prompt\" (a string or a list of messages)")
        if "answer" in rec and not isinstance(rec["answer"], (str, int, float)):
            raise UserError(f"{path}:{lineno}: \"answer\" must be a string or a number")
        records.append(rec)
    if not records:
        raise UserError(f"{path} holds no prompts")
    return records


def encode_prompts(records: list[dict[str, Any]], ct: ChatTokenizer, max_prompt_len: int,
                   path: Path) -> list[PromptRecord]:
    """Chat-encode every prompt; prompts that leave no room for the completion are dropped
    (logged with their count), and none left is a `UserError`."""
    out, dropped = [], 0
    for i, rec in enumerate(records):
        messages = [{"role": "user", "content": rec["prompt"]}] if isinstance(rec["prompt"], str) else rec["prompt"]
        ids = encode_prompt(ct, messages)
        if len(ids) > max_prompt_len:
            dropped += 1
            continue
        out.append(PromptRecord(i, rec, ids))
    if dropped:
        logger.warning("%d of %d prompts in %s are longer than %d tokens (max_seq_len - max_new_tokens): skipped",
                       dropped, len(records), path, max_prompt_len)
    if not out:
        raise UserError(f"no prompt of {path} fits in {max_prompt_len} tokens (model max_seq_len minus "
                        "rl.sampling.max_new_tokens): lower max_new_tokens or use shorter prompts")
    return out


def split_prompts(prompts: list[PromptRecord], val: int, path: Path) -> tuple[list[PromptRecord], list[PromptRecord]]:
    """(train, held-out): the last ``val`` prompts are held out."""
    if val >= len(prompts):
        raise UserError(f"{path}: {len(prompts)} usable prompts, but rl.val_prompts={val} holds out all of them")
    return (prompts[:-val], prompts[-val:]) if val else (prompts, [])


def request_seed(*parts: Any) -> int:
    """A per-request sampling seed from its identity (run seed, rollout, prompt, sample): the same
    request gets the same tokens whatever else is in the batch, on any number of ranks."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:7], "little")


@dataclass
class Sample:
    """One generated completion of one prompt."""

    prompt: PromptRecord
    completion_ids: list[int]  # the generated tokens, a final end-of-turn token included
    text: str  # the completion's text (before a stop string, without the end-of-turn token)
    finish_reason: Optional[str]


def completion_batch(samples: list[Sample]) -> dict[str, torch.Tensor]:
    """The sample-space tensors of a rollout: ``completion`` (S, L) token ids (0-padded),
    ``mask`` (S, L) 1 on generated tokens, ``completion_len`` (S,) and ``truncated`` (S,) (the
    completion hit max_new_tokens: no end of turn)."""
    width = max([len(s.completion_ids) for s in samples] + [1])
    completion = torch.zeros((len(samples), width), dtype=torch.long)  # (S, L)
    mask = torch.zeros((len(samples), width), dtype=torch.float32)  # (S, L)
    for i, s in enumerate(samples):
        completion[i, :len(s.completion_ids)] = torch.tensor(s.completion_ids, dtype=torch.long)
        mask[i, :len(s.completion_ids)] = 1.0
    lengths = torch.tensor([len(s.completion_ids) for s in samples], dtype=torch.long)
    truncated = torch.tensor([s.finish_reason == "length" for s in samples], dtype=torch.bool)
    return {"completion": completion, "mask": mask, "completion_len": lengths, "truncated": truncated}


def pack_rows(samples: list[Sample], pad_id: int, share_prompts: bool) -> dict[str, torch.Tensor]:
    """The training forward's input for these samples (see the module docstring).

    ``share_prompts``: one row per distinct prompt (in order of first appearance), laid out
    ``prompt | c_1 | c_2 | ...`` with ``doc_ids`` (-1 on the prompt, j on c_j, 0 on padding) and
    ``positions`` (c_j continues after the prompt; padding at 0). Otherwise one row per sample,
    ``prompt + completion``, right-padded. Both: ``input_ids`` (R, W) and ``src`` (S, L), the
    flat index r·W + t of the position predicting completion token l of sample s (0 beyond it).
    """
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, s in enumerate(samples):
        groups.setdefault(tuple(s.prompt.ids) if share_prompts else (i,), []).append(i)
    rows = list(groups.values())
    widths = [len(samples[m[0]].prompt.ids) + sum(len(samples[i].completion_ids) for i in m) for m in rows]
    width = max(widths)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)  # (R, W)
    doc_ids = torch.zeros((len(rows), width), dtype=torch.long)  # (R, W)
    positions = torch.zeros((len(rows), width), dtype=torch.long)  # (R, W)
    src = torch.zeros((len(samples), max([len(s.completion_ids) for s in samples] + [1])), dtype=torch.long)
    for r, members in enumerate(rows):
        prompt = samples[members[0]].prompt.ids
        n = len(prompt)
        ids[r, :n] = torch.tensor(prompt, dtype=torch.long)
        doc_ids[r, :n] = SHARED_PREFIX
        positions[r, :n] = torch.arange(n)
        at = n
        for j, i in enumerate(members, 1):
            c = samples[i].completion_ids
            ids[r, at:at + len(c)] = torch.tensor(c, dtype=torch.long)
            doc_ids[r, at:at + len(c)] = j
            positions[r, at:at + len(c)] = torch.arange(n, n + len(c))
            # token 0 is predicted by the prompt's last position, token l > 0 by token l - 1
            predictors = ([n - 1] + list(range(at, at + len(c) - 1)))[:len(c)]
            src[i, :len(c)] = r * width + torch.tensor(predictors, dtype=torch.long)
            at += len(c)
    out = {"input_ids": ids, "src": src}
    if share_prompts:
        out.update(doc_ids=doc_ids, positions=positions)
    return out


def cat_samples(parts: list[torch.Tensor]) -> torch.Tensor:
    """Per-micro-batch (s_i, l_i) columns stacked into one (S, L) tensor, zero-padded on the
    right: each micro-batch is only as wide as its own longest completion."""
    width = max(p.shape[1] for p in parts)
    return torch.cat([torch.nn.functional.pad(p, (0, width - p.shape[1])) for p in parts])


def sft_rows(samples: list[Sample], pad_id: int) -> dict[str, torch.Tensor]:
    """Rejection-sampling fine-tuning rows ``prompt + completion``, right-padded: ``input_ids``
    (B, T) and ``labels`` (B, T) holding the next token on completion positions and
    IGNORE_INDEX elsewhere (the SFT loss's format)."""
    rows = [s.prompt.ids + s.completion_ids for s in samples]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)  # (B, T)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)  # (B, T)
    for b, (s, row) in enumerate(zip(samples, rows)):
        ids[b, :len(row)] = torch.tensor(row, dtype=torch.long)
        start = len(s.prompt.ids) - 1  # the position predicting the first completion token
        labels[b, start:start + len(s.completion_ids)] = torch.tensor(s.completion_ids, dtype=torch.long)
    return {"input_ids": ids, "labels": labels}
