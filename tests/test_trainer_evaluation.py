"""Validation loss and sample generations during training (trainer/evaluation.py)."""
from __future__ import annotations

import contextlib
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from model import build_model
from trainer.evaluation import evaluate, generate, sample_next
from trainer.losses import IGNORE_INDEX, causal_lm_loss
from trainer_fixtures import tiny_config, one_thread  # noqa: F401 (autouse fixture)


@pytest.fixture
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(tiny_config(Path("."), Path(".")).model)


def test_greedy_generation_with_cache_matches_full_recompute(model: torch.nn.Module) -> None:
    prompt = [5, 9, 11]
    out = generate(model, prompt, max_new_tokens=6)
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(6):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    assert out == seq[len(prompt):]
    assert model.training  # mode restored


def test_generation_stops_at_eos_and_context(model: torch.nn.Module) -> None:
    first = generate(model, [5, 9], max_new_tokens=1)[0]
    assert generate(model, [5, 9], max_new_tokens=5, stop_ids={first}) == [first]
    # a 36-token prompt with max_seq_len 32: the prompt keeps its last 31 tokens, one new token fits
    assert len(generate(model, list(range(4, 40)), max_new_tokens=10)) == 1


def test_top_k_sampling_stays_in_the_top_k() -> None:
    logits = torch.tensor([[0.0, 5.0, 4.0, -3.0, 1.0]])
    g = torch.Generator().manual_seed(0)
    picks = {int(sample_next(logits, 2, g)) for _ in range(50)}
    assert picks == {1, 2}
    assert int(sample_next(logits, 0, None)) == 1  # greedy


def test_evaluate_is_mean_cross_entropy_over_all_targets(model: torch.nn.Module) -> None:
    g = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(3):
        tokens = torch.randint(4, 64, (2, 9), generator=g)
        labels = tokens[:, 1:].clone()
        labels[0, :3] = IGNORE_INDEX
        batches.append({"input_ids": tokens[:, :-1], "labels": labels})
    result = evaluate(model, iter(batches), causal_lm_loss, num_batches=2, device=torch.device("cpu"),
                      amp=contextlib.nullcontext)
    with torch.no_grad():
        logits = torch.cat([model(b["input_ids"]) for b in batches[:2]])
        labels = torch.cat([b["labels"] for b in batches[:2]])
    ref = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX).item()
    assert result["val_tokens"] == 2 * (16 - 3)
    assert result["val_loss"] == pytest.approx(ref, rel=1e-6)
    assert result["val_ppl"] == pytest.approx(math.exp(ref), rel=1e-6)
    assert model.training
