"""Score a response to a prompt with a reward model (the scalar RLHF optimises).

    python align/score.py --checkpoint RM --prompt "..." --response "..." [--system TEXT] [--json]
        [--device auto|cpu|cuda|mps] [--dtype auto|float32|bfloat16|float16]

The reward model (`model.reward.RewardModel`, as in InstructGPT, Ouyang et al. 2022, §3.5) reads
``prompt + response`` and returns its score head's scalar at the last real token. The text is
encoded exactly as the preference pairs it was trained on
(`data_pipeline.processing.build_preference_bins.encode_pair`): the prompt as a user turn of the
ChatML template ending with the generation header (`encode_prompt`), the response as its text
plus ``<|im_end|>`` (`encode_response`), a response too long for the model's ``max_seq_len`` cut
keeping ``<|im_end|>``. So a score here is the score training saw.

Accepted: our reward-model checkpoints (config.json ``"task": "reward_model"``, written by
``align/train_reward_model.py``) and Hugging Face ``*ForSequenceClassification`` directories with
one label, carrying the project's tokenizer (``tokenizer.json`` with the chat special tokens).
Prints the reward (one float) on stdout, or with ``--json`` one object with the token counts.

`load_reward_model`, `score`, `score_batch` and `score_token_ids` (rows already encoded, as
rollouts have them) are the API that online RL reuses.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from pydantic import ValidationError
from tokenizers import Tokenizer

from data_pipeline.chat import ChatTokenizer, Message, check_messages, encode_prompt, encode_response
from inference.engine.loading import build_from_weights
from model.build import keep_fp32_modules
from model.config import ModelConfig
from model.hf import HFFormatError, is_reward_config, load_hf_reward_dir
from model.reward import RewardModel
from utils.checkpoint import CAUSAL_LM, REWARD_MODEL, TASK_KEY, load_checkpoint
from utils.device import pick_device, pick_dtype
from utils.errors import UserError, cli_main

Prompt = Union[str, list[Message]]  # a user message, or a conversation ending with a user turn
NOT_A_REWARD_MODEL = "is a causal language model, not a reward model (train one with align/train_reward_model.py)"


# ---------------------------------------------------------------- loading
def _read_config(path: Path) -> dict:
    if not path.exists():
        raise UserError(f"checkpoint not found: {path}")
    if not (path / "config.json").is_file():
        raise UserError(f"not a checkpoint directory (no config.json): {path}")
    try:
        raw = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read {path / 'config.json'}: {e}") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path / 'config.json'} is not a JSON object")
    return raw


def _reward_weights(path: Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """(config, RewardModel state dict on the CPU) of our checkpoint or a HF sequence classifier."""
    raw = _read_config(path)
    if "model_type" in raw:  # a Hugging Face transformers directory
        if raw.get("architectures") and not is_reward_config(raw):
            raise UserError(f"{path} {NOT_A_REWARD_MODEL}")
        try:
            return load_hf_reward_dir(path)
        except HFFormatError as e:
            raise UserError(str(e)) from None
    task = raw.get(TASK_KEY, CAUSAL_LM)
    if task == CAUSAL_LM:
        raise UserError(f"{path} {NOT_A_REWARD_MODEL}")
    if task != REWARD_MODEL:
        raise UserError(f"{path / 'config.json'}: unknown {TASK_KEY} {task!r} (allowed: {CAUSAL_LM}, {REWARD_MODEL})")
    ckpt = load_checkpoint(path)
    try:
        cfg = ModelConfig(**ckpt.model_config)
    except ValidationError as e:
        err = e.errors()[0]
        raise UserError(f"{path / 'config.json'}: {'.'.join(map(str, err['loc'])) or 'config'}: {err['msg']}") from None
    return cfg, ckpt.state_dict


def _chat_tokenizer(path: Path, vocab_size: int) -> ChatTokenizer:
    file = path / "tokenizer.json"
    if not file.is_file():
        raise UserError(f"{path} has no tokenizer.json to encode the prompt and response with "
                        "(copy the tokenizer the reward model was trained with beside its weights)")
    try:
        tok = Tokenizer.from_file(str(file))
    except Exception as e:  # `tokenizers` raises plain Exceptions for unreadable files
        raise UserError(f"{file} is not a valid tokenizer.json ({str(e).splitlines()[0]})") from None
    try:
        ct = ChatTokenizer.wrap(tok)
    except UserError as e:
        raise UserError(f"{file}: {e}") from None
    if ct.vocab_size > vocab_size:
        raise UserError(f"{file} has {ct.vocab_size} tokens but the reward model's vocab_size is {vocab_size}")
    return ct


def load_reward_model(
    path: Union[str, Path], device: Union[str, torch.device] = "auto", dtype: Union[str, torch.dtype] = "auto",
) -> tuple[RewardModel, ChatTokenizer]:
    """A reward-model checkpoint or HF ``*ForSequenceClassification`` directory → (model in eval
    mode on ``device`` in ``dtype``, its chat tokenizer). Every user mistake is a `UserError`."""
    path = Path(path)
    device = pick_device(device)
    dtype = pick_dtype(dtype, device)
    cfg, state_dict = _reward_weights(path)
    tokenizer = _chat_tokenizer(path, cfg.vocab_size)
    model = build_from_weights(cfg, state_dict, path, RewardModel)
    model = keep_fp32_modules(model.to(device=device, dtype=dtype)).eval()
    model.requires_grad_(False)
    return model, tokenizer


# ---------------------------------------------------------------- scoring
def encode_scored(ct: ChatTokenizer, prompt: Prompt, response: str, max_len: int) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids) as the preference bins encode a pair (`encode_pair`): the response
    cut to ``max_len`` in all, keeping its <|im_end|>. ValueError when the prompt leaves no room."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    check_messages(messages, last_role="user")
    prompt_ids = encode_prompt(ct, messages)
    room = max_len - len(prompt_ids)
    if room < 2:
        raise ValueError(f"the prompt is {len(prompt_ids)} tokens: it leaves no room for a response "
                         f"within the reward model's max_seq_len {max_len}")
    reply = encode_response(ct, response)
    return prompt_ids, reply if len(reply) <= room else reply[:room - 1] + [ct.im_end_id]


@torch.inference_mode()
def score_token_ids(model: RewardModel, pad_id: int, rows: Sequence[Sequence[int]],
                    batch_size: int = 16) -> list[float]:
    """The reward of each already encoded ``prompt + response`` row, in order. Rows are
    right-padded into batches of similar length; the model reads each at its last real token,
    so the padding changes nothing. ValueError for an empty row or one over ``max_seq_len``."""
    bad = next((i for i, r in enumerate(rows) if not 0 < len(r) <= model.cfg.max_seq_len), None)
    if bad is not None:
        raise ValueError(f"row {bad} has {len(rows[bad])} tokens (allowed: 1 to max_seq_len {model.cfg.max_seq_len})")
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    device = model.embed.weight.device
    out = [0.0] * len(rows)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        width = max(len(rows[i]) for i in chunk)
        tokens = torch.full((len(chunk), width), pad_id, dtype=torch.long)  # (B, T)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)  # (B, T), 1 on real tokens
        for b, i in enumerate(chunk):
            tokens[b, :len(rows[i])] = torch.tensor(list(rows[i]), dtype=torch.long)
            mask[b, :len(rows[i])] = 1
        rewards = model(tokens.to(device), attention_mask=mask.to(device))  # (B,)
        for i, r in zip(chunk, rewards.tolist()):
            out[i] = r
    return out


def score_batch(model: RewardModel, tokenizer: ChatTokenizer, prompts: Sequence[Prompt], responses: Sequence[str],
                batch_size: int = 16) -> list[float]:
    """The reward of each (prompt, response), in order (encoded by `encode_scored`)."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    max_len = model.cfg.max_seq_len
    rows = [sum(encode_scored(tokenizer, p, r, max_len), []) for p, r in zip(prompts, responses)]
    return score_token_ids(model, tokenizer.pad_id, rows, batch_size)


def score(model: RewardModel, tokenizer: ChatTokenizer, prompt: Prompt, response: str) -> float:
    """The reward of one response to one prompt."""
    return score_batch(model, tokenizer, [prompt], [response])[0]


# ---------------------------------------------------------------- CLI
def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="reward-model checkpoint or HF *ForSequenceClassification dir")
    p.add_argument("--prompt", required=True, help="the user message")
    p.add_argument("--response", required=True, help="the assistant reply to score")
    p.add_argument("--system", default=None, help="optional system message before the prompt")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the bare reward")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    p.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    model, tokenizer = load_reward_model(args.checkpoint, args.device, args.dtype)
    messages = ([{"role": "system", "content": args.system}] if args.system is not None else []) + \
        [{"role": "user", "content": args.prompt}]
    try:
        prompt_ids, response_ids = encode_scored(tokenizer, messages, args.response, model.cfg.max_seq_len)
    except ValueError as e:
        raise UserError(str(e)) from None
    reward = score_token_ids(model, tokenizer.pad_id, [prompt_ids + response_ids])[0]
    if args.json:
        full = len(encode_response(tokenizer, args.response))
        print(json.dumps({"reward": reward, "prompt_tokens": len(prompt_ids), "response_tokens": len(response_ids),
                          "truncated": len(response_ids) < full}))
    else:
        print(reward)


if __name__ == "__main__":
    cli_main(main)
