"""Tiny data, tokenizer and configs for the training-engine tests (no test functions here).

The data is a learnable pattern: each document counts upwards from a random start with a
random stride (mod the word vocabulary), so a 2-layer model's loss falls within a few dozen
steps. The tokenizer is a word-level HF `tokenizers` tokenizer whose words are the token ids.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers

from data_pipeline.formats import SPECIAL_TOKENS, DataLayout, TokenBinWriter, token_dtype
from data_pipeline.tokenizer import tokenizer_hash
from utils.config import ExperimentConfig, validate

VOCAB = 64


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models train several times faster on one thread, above all on a busy machine
    (OpenMP threads of several processes spin against each other). Imported by the
    test modules, where autouse applies it to every test."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

N_SPECIAL = len(SPECIAL_TOKENS)  # ids 0..3: <|endoftext|>, <|pad|>, <|im_start|>, <|im_end|>


def make_tokenizer(directory: Path, vocab_size: int = VOCAB) -> Path:
    """A word-level tokenizer: the special tokens, then words "w4" ... "w{vocab-1}"."""
    directory.mkdir(parents=True, exist_ok=True)
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    vocab.update({f"w{i}": i for i in range(N_SPECIAL, vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=SPECIAL_TOKENS[1]))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(SPECIAL_TOKENS)
    tok.save(str(directory / "tokenizer.json"))
    return directory


def pattern_docs(n_docs: int, seed: int, vocab_size: int = VOCAB) -> list[list[int]]:
    """Documents ``start, start+s, start+2s, ...`` over the word ids, each ending in EOS (id 0)."""
    rng = np.random.default_rng(seed)
    words = vocab_size - N_SPECIAL
    docs = []
    for _ in range(n_docs):
        start, stride, length = rng.integers(words), rng.integers(1, 3), rng.integers(12, 40)
        docs.append([N_SPECIAL + int((start + stride * i) % words) for i in range(length)] + [0])
    return docs


def make_pretrain_data(root: Path, n_train_docs: int = 400, n_val_docs: int = 60, vocab_size: int = VOCAB) -> Path:
    """``root/data`` with tokenizer/ and pretrain/{train,val} bins; returns the data dir."""
    layout = DataLayout(root / "data")
    make_tokenizer(layout.tokenizer_dir, vocab_size)
    tok_hash = tokenizer_hash(layout.tokenizer_dir)
    for split, n_docs, seed in (("train", n_train_docs, 0), ("val", n_val_docs, 1)):
        writer = TokenBinWriter(layout.pretrain(split), token_dtype(vocab_size), with_offsets=False)
        docs = pattern_docs(n_docs, seed, vocab_size)
        writer.add([np.concatenate(docs)])
        writer.close(kind="pretrain", vocab_size=vocab_size, tokenizer_hash=tok_hash, eos_id=0, pad_id=1,
                     created_by="tests/trainer_fixtures.py", source={"pattern": split})
    return layout.root


def tiny_config_dict(data_dir: Path, runs_dir: Path, run_name: str = "test", **sections: dict[str, Any]) -> dict:
    """A config of a ~50k-parameter model that trains in about a second per 10 steps on CPU."""
    cfg: dict[str, Any] = {
        "model": {"vocab_size": VOCAB, "dim": 32, "n_layers": 2, "n_heads": 4, "ffn_hidden_dim": 64,
                  "max_seq_len": 32},
        "data": {"data_dir": str(data_dir)},
        "training": {"batch_size": 4, "max_steps": 20, "learning_rate": 3e-3, "warmup_steps": 2,
                     "device": "cpu", "eval_interval": 10, "eval_steps": 2},
        "logging": {"runs_dir": str(runs_dir), "run_name": run_name, "log_interval": 1},
        "checkpointing": {"save_interval": 10, "keep_last": 2},
    }
    for name, values in sections.items():
        cfg.setdefault(name, {}).update(values)
    return cfg


def tiny_config(data_dir: Path, runs_dir: Path, run_name: str = "test", **sections: dict[str, Any]) -> ExperimentConfig:
    return validate(tiny_config_dict(data_dir, runs_dir, run_name, **sections), ExperimentConfig)


class ListLoader:
    """An endless iterator over fixed batches with the loader's resume protocol."""

    def __init__(self, batches: list[dict]) -> None:
        self.batches = batches
        self.pos = 0

    def __iter__(self) -> "ListLoader":
        return self

    def __next__(self) -> dict:
        batch = self.batches[self.pos % len(self.batches)]
        self.pos += 1
        return batch

    def state_dict(self) -> dict:
        return {"pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.pos = int(state["pos"])


def make_trainer(cfg: ExperimentConfig, model, train_data, root: Path, **kwargs):
    """A single-process CPU `Trainer` writing to ``root/runs``."""
    from trainer.distributed import DistInfo
    from trainer.engine import Trainer
    from trainer.losses import causal_lm_loss
    from utils.runs import RunDir

    dist = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), is_distributed=False)
    run = RunDir(cfg.logging.runs_dir, "test", cfg.logging.run_name).create(cfg)
    return Trainer(cfg, model, kwargs.pop("loss_fn", causal_lm_loss), train_data, run, dist, stage="test", **kwargs)
