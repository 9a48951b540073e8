"""Helpers for the inference-engine tests (no test functions here).

- `save_model(cfg, directory, tokenizer_dir)`: a random model of config ``cfg`` saved as a
  checkpoint (with the tokenizer files when given), the way training writes them.
- `greedy_reference(model, prompt, n)`: greedy decoding by a full forward over the whole
  sequence for every new token (no cache): what the engine must reproduce.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from model import build_model
from model.config import ModelConfig
from utils.checkpoint import save_checkpoint


def save_model(cfg: ModelConfig, directory: Path, tokenizer_dir: Optional[Path] = None, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    model = build_model(cfg)
    return save_checkpoint(directory, model.state_dict(), cfg.model_dump(), tokenizer_dir=tokenizer_dir)


@torch.no_grad()
def greedy_reference(model: torch.nn.Module, prompt: list[int], n: int) -> list[int]:
    tokens = list(prompt)
    for _ in range(n):
        logits = model(torch.tensor([tokens]))[0, -1]
        tokens.append(int(logits.argmax()))
    return tokens[len(prompt):]
