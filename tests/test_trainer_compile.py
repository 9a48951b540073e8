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


@pytest.mark.slow
def test_compiled_training_saves_no_wrapper_prefixes(tmp_path: Path) -> None:
    torch._dynamo.reset()
    trainer = _trainer(tmp_path, "aot_eager")
    assert hasattr(trainer.model, "_orig_mod")  # really compiled
    assert any(k.startswith("_orig_mod.") for k in trainer.model.state_dict())
    trainer.train_step()
    assert trainer.model is not trainer.eager_model  # no fallback happened
    path = trainer.save()
    ckpt = load_checkpoint(path, load_training_state=True)
    assert not any(k.startswith(("_orig_mod.", "module.")) for k in ckpt.state_dict)
    assert not any("_orig_mod" in k for k in ckpt.training_state["optimizer"]["state"])
    assert set(ckpt.state_dict) == {k for k, _ in build_model(trainer.cfg.model).named_parameters()}


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
    assert stats["decision"].action == "step" and trainer.model is trainer.eager_model
