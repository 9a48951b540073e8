"""`training.compile`: compiled training saves clean weights; a failing compile falls back
to eager with a warning (trainer/engine.py)."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
import torch._dynamo

from model import build_model
from trainer_fixtures import ListLoader, make_trainer, pattern_docs, tiny_config, one_thread  # noqa: F401 (autouse fixture)
from utils.checkpoint import load_checkpoint


def _batches() -> list[dict]:
    tokens = torch.tensor([t for d in pattern_docs(30, 0) for t in d])[: 2 * 4 * 33].view(8, 33)
    return [{"input_ids": r[:, :-1], "labels": r[:, 1:]} for r in tokens.split(4)]


def _trainer(tmp_path: Path, backend: str):
    cfg = tiny_config(tmp_path, tmp_path / "runs", training={"compile": True, "compile_backend": backend,
                                                             "max_steps": 2})
    torch.manual_seed(0)
    return make_trainer(cfg, build_model(cfg.model), ListLoader(_batches()), tmp_path)


def _graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


@pytest.mark.slow
def test_compiled_training_saves_no_wrapper_prefixes(tmp_path: Path) -> None:
    torch._dynamo.reset()
    trainer = _trainer(tmp_path, "aot_eager")
    blocks = trainer._compiled_blocks
    assert len(blocks) == trainer.cfg.model.n_layers and all("forward" in b.__dict__ for b in blocks)
    before = _graphs()
    trainer.train_step()
    assert _graphs() > before  # really compiled, and no fallback happened
    assert all("forward" in b.__dict__ for b in blocks)
    compiled = _graphs()
    trainer.model.eval()
    with torch.no_grad():  # eval mode, no grad (validation, samples, rollouts): eager, nothing compiles again
        trainer.model(_batches()[0]["input_ids"])
    trainer.model.train()
    assert _graphs() == compiled
    path = trainer.save()
    ckpt = load_checkpoint(path, load_training_state=True)
    assert not any(k.startswith(("_orig_mod.", "module.")) or "_orig_mod" in k for k in ckpt.state_dict)
    assert not any("_orig_mod" in k for k in ckpt.training_state["optimizer"]["state"])
    assert set(ckpt.state_dict) == {k for k, _ in build_model(trainer.cfg.model).named_parameters()}


@pytest.mark.slow
def test_compiled_moe_training_does_not_recompile(tmp_path: Path) -> None:
    """The DeepSeek-V3 nano recipe's model: the routed experts' group sizes change every step and
    stay out of the graphs, so steps 3-20 compile nothing (no new graph, no recompile)."""
    from torch._dynamo.utils import counters

    from model.presets import classic_config

    torch._dynamo.reset()
    cfg = tiny_config(tmp_path, tmp_path / "runs", training={"compile": True, "compile_backend": "aot_eager",
                                                             "max_steps": 20})
    cfg.model = classic_config("deepseek_v3", "nano")
    assert cfg.model.moe is not None and cfg.model.mtp_depth == 1
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(0, cfg.model.vocab_size, (2, 65), generator=g) for _ in range(20)]  # new routing each step
    batches = [{"input_ids": r[:, :-1], "labels": r[:, 1:]} for r in rows]
    trainer = make_trainer(cfg, build_model(cfg.model), ListLoader(batches), tmp_path)
    # the main stack only: the MTP block runs on T - 1 positions and would make the graphs dynamic
    assert trainer._compiled_blocks == list(trainer.base.layers)
    for _ in range(2):  # warm-up: the dense and the MoE block kinds compile here
        trainer.train_step()
    # every frame dynamo compiles (a first compile or a recompile) counts in frames/total
    graphs, frames = _graphs(), counters["frames"]["total"]
    assert graphs >= 2
    for _ in range(18):  # steps 3-20
        trainer.train_step()
    assert _graphs() == graphs and counters["frames"]["total"] == frames


def test_failing_compile_falls_back_to_eager_with_a_warning(tmp_path: Path, caplog) -> None:
    @torch._dynamo.register_backend(name="always_fails_for_test")
    def always_fails(gm, example_inputs):
        raise RuntimeError("this backend cannot compile anything")

    torch._dynamo.reset()
    trainer = _trainer(tmp_path, "always_fails_for_test")
    with caplog.at_level(logging.WARNING, logger="trainer.engine"):
        stats = trainer.train_step()
        trainer.train_step()
    warnings = [r.getMessage() for r in caplog.records if "torch.compile" in r.getMessage()]
    assert len(warnings) == 1 and "continuing without it" in warnings[0]
    assert stats["decision"].action == "step"
    assert trainer._compiled_blocks and not any("forward" in b.__dict__ for b in trainer._compiled_blocks)
