"""RL prompts and rollout batches: reading the prompts file, encoding, collating.

The prompts file is JSON Lines, one ``{"prompt": str, "answer": str, ...}`` per line (what
`data_pipeline/download/download_prompts.py` writes; ``answer`` is what the verifiable reward
compares against, any other field reaches the reward functions untouched). A prompt is the
user turn of a conversation in the one chat template; ``prompt`` may also be a list of
messages ending with a user message. The file's last ``rl.val_prompts`` prompts are held out:
never trained on, they measure the held-out reward.

A rollout batch is right-padded ``prompt + completion`` rows. Per-token tensors live in
*target* space (B, T-1): column t describes token t+1 as predicted from position t, so
``mask[:, t]`` is 1 where token t+1 was generated (the completion, its end-of-turn token
included) and the log-prob tensors line up with ``logits[:, :-1]``.
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


def collate(samples: list[Sample], pad_id: int) -> dict[str, torch.Tensor]:
    """Rows ``prompt + completion``, right-padded: ``input_ids`` (B, T) and the completion
    ``mask`` (B, T-1) in target space, plus ``completion_len`` (B,) and ``truncated`` (B,) (the
    completion hit max_new_tokens: no end of turn)."""
    rows = [s.prompt.ids + s.completion_ids for s in samples]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(rows), width - 1), dtype=torch.float32)  # (B, T-1)
    for b, (s, row) in enumerate(zip(samples, rows)):
        ids[b, :len(row)] = torch.tensor(row, dtype=torch.long)
        start = len(s.prompt.ids) - 1  # target column of the first completion token
        mask[b, start:start + len(s.completion_ids)] = 1.0
    lengths = torch.tensor([len(s.completion_ids) for s in samples], dtype=torch.long)
    truncated = torch.tensor([s.finish_reason == "length" for s in samples], dtype=torch.bool)
    return {"input_ids": ids, "mask": mask, "completion_len": lengths, "truncated": truncated}


def sft_rows(samples: list[Sample], pad_id: int) -> dict[str, torch.Tensor]:
    """Rejection-sampling fine-tuning rows: ``input_ids`` (B, T) and ``labels`` (B, T) holding the
    next token on completion positions and IGNORE_INDEX elsewhere (the SFT loss's format)."""
    batch = collate(samples, pad_id)
    ids, mask = batch["input_ids"], batch["mask"]
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, :-1] = torch.where(mask.bool(), ids[:, 1:], IGNORE_INDEX)
    return {"input_ids": ids, "labels": labels}


def slice_batch(batch: dict[str, torch.Tensor], index: torch.Tensor) -> dict[str, torch.Tensor]:
    """The rows ``index`` of every tensor, trimmed to the longest row's width (padding columns
    that no row uses are dropped, so a micro-batch pays only for its own length)."""
    out = {k: v[index] for k, v in batch.items()}
    if "mask" in out:
        used = out["mask"].sum(0).nonzero()
        width = int(used.max()) + 2 if used.numel() else 2  # target column t covers token t + 1
        out = {k: (v[:, :width] if k == "input_ids" else v[:, :width - 1] if v.dim() == 2 else v)
               for k, v in out.items()}
    return out
