"""Checkpoints of a training run: exact resume, crash safety, retention (trainer/checkpointing.py)."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import pretrain.train as pretrain
from model import ModelConfig, build_model
from trainer.checkpointing import CheckpointManager, resolve_resume
from trainer_fixtures import make_pretrain_data, tiny_config, tiny_config_dict, one_thread  # noqa: F401 (autouse fixture)
from utils.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint, step_dir
from utils.errors import UserError
from utils.paths import REPO_ROOT


def _losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "loss" in r]
    assert len(steps) == len(set(steps)), f"steps logged twice: {steps}"
    return {r["step"]: r["loss"] for r in records if "loss" in r}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return make_pretrain_data(tmp_path_factory.mktemp("resume"))


def test_resume_is_bit_identical(data_dir: Path, tmp_path: Path) -> None:
    """2N steps straight == N steps, stop, resume from the checkpoint, N more (CPU fp32):
    same losses bit for bit and the same final weights (model, AdamW moments, data position,
    RNG and schedule all restored)."""
    n = 6
    common = dict(training={"max_steps": 2 * n, "eval_interval": 4, "warmup_steps": 3},
                  checkpointing={"save_interval": 100}, model={"dropout": 0.1})  # dropout: RNG matters
    straight = tiny_config(data_dir, tmp_path / "runs", run_name="straight", **common)
    pretrain.train(straight)
    pieces = tiny_config(data_dir, tmp_path / "runs", run_name="pieces", **common)
    first = pretrain.train(pieces, stop_at=n)
    assert first["final_checkpoint"] is None and first["step"] == n
    with pytest.raises(UserError, match="already holds checkpoints"):  # a fresh start would mix two runs
        pretrain.train(tiny_config(data_dir, tmp_path / "runs", run_name="pieces", **common))
    with open(tmp_path / "runs/pretrain/pieces/metrics.jsonl", "a") as f:  # logged, then killed before a save
        f.write(json.dumps({"step": n + 1, "loss": 99.0}) + "\n")
    resumed = tiny_config(data_dir, tmp_path / "runs", run_name="pieces", **common)
    pretrain.train(resumed, resume="auto")

    a, b = _losses(tmp_path / "runs/pretrain/straight"), _losses(tmp_path / "runs/pretrain/pieces")
    assert sorted(a) == sorted(b) == list(range(1, 2 * n + 1))
    assert [a[s] for s in a] == [b[s] for s in a]
    wa = load_checkpoint(tmp_path / "runs/pretrain/straight/checkpoints/final").state_dict
    wb = load_checkpoint(tmp_path / "runs/pretrain/pieces/checkpoints/final").state_dict
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_checkpoint_contents_for_inference(data_dir: Path, tmp_path: Path) -> None:
    cfg = tiny_config(data_dir, tmp_path / "runs", training={"max_steps": 4},
                      checkpointing={"save_interval": 1, "keep_last": 2})
    pretrain.train(cfg)
    ckpts = tmp_path / "runs/pretrain/test/checkpoints"
    assert [p.name for p in list_checkpoints(ckpts)] == ["step_00000003", "step_00000004"]  # keep_last 2
    final = load_checkpoint(ckpts / "final")
    assert (ckpts / "final/tokenizer.json").is_file() and not (ckpts / "final/training_state").exists()
    model = build_model(ModelConfig(**final.model_config))  # what inference does
    model.load_state_dict(final.state_dict)  # strict: every weight present, no stray keys
    assert not any(k.startswith(("_orig_mod.", "module.")) for k in final.state_dict)
    state = load_checkpoint(ckpts / "step_00000004", load_training_state=True).training_state
    assert state["step"] == 4 and state["ranks"][0]["data"]["step"] == 4
    assert set(state["optimizer"]["state"]) == set(final.state_dict)  # AdamW moments of every weight
    assert (tmp_path / "runs/pretrain/test/loss.png").is_file()


def test_keep_last_keeps_best(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path, keep_last=1, keep_best=True, is_writer=True)
    for step, val in ((1, 3.0), (2, 1.0), (3, None), (4, 2.5), (5, None)):  # 3, 5: not validated
        if val is not None:
            mgr.consider_best(step, val)
        mgr.save(step, {"w": torch.zeros(1)}, {"dim": 1}, {"step": step, "best": mgr.state_dict()}, {}, None)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000002", "step_00000005"]
    assert mgr.state_dict() == {"best_loss": 1.0, "best_step": 2, "best_seen": None}


def test_the_log_calls_a_validation_best_against_every_earlier_one(tmp_path: Path) -> None:
    """Saved or not: an evaluation between two saves is judged against the earlier evaluations,
    not only against the saved checkpoints (which once made every such evaluation "best")."""
    mgr = CheckpointManager(tmp_path, keep_last=1, keep_best=True, is_writer=True)
    assert [mgr.note_validation(v) for v in (3.0, 2.0, 2.5, 2.0, 1.0)] == [True, True, False, False, True]
    assert mgr.best_loss is None  # nothing saved: the checkpoints' best is untouched
    again = CheckpointManager(tmp_path, keep_last=1, keep_best=True, is_writer=True)
    again.load_state_dict(mgr.state_dict())  # a resumed run remembers it
    assert not again.note_validation(1.5) and again.note_validation(0.5)
    again.load_state_dict({"best_loss": 2.0, "best_step": 4})  # a checkpoint from before best_seen
    assert not again.note_validation(2.0)


def test_resolve_resume(tmp_path: Path) -> None:
    ckpts = tmp_path / "run/checkpoints"
    assert resolve_resume(None, ckpts) is None
    assert resolve_resume("auto", ckpts) is None  # nothing yet: fresh start
    mgr = CheckpointManager(ckpts, keep_last=3, keep_best=False, is_writer=True)
    mgr.save(5, {"w": torch.zeros(1)}, {"dim": 1}, {"step": 5}, {}, None)
    assert resolve_resume("auto", ckpts) == step_dir(ckpts, 5)
    assert resolve_resume(str(tmp_path / "run"), ckpts) == step_dir(ckpts, 5)
    with pytest.raises(UserError, match="no such"):
        resolve_resume(str(tmp_path / "nope"), ckpts)
    mgr.save_final({"w": torch.zeros(1)}, {"dim": 1}, {}, None)
    with pytest.raises(UserError, match="weights only"):
        resolve_resume(str(ckpts / "final"), ckpts)


SLOW_SAVE_DRIVER = textwrap.dedent("""
    # Runs pretrain/train.py with every checkpoint file write slowed down, so that a SIGKILL
    # from the test lands in the middle of a save.
    import runpy, sys, time
    import utils.checkpoint as ck
    _save_file = ck.save_file
    def slow_save_file(*args, **kwargs):
        _save_file(*args, **kwargs)
        time.sleep(0.25)
    ck.save_file = slow_save_file
    sys.argv = ["pretrain/train.py", *sys.argv[1:]]
    runpy.run_path("pretrain/train.py", run_name="__main__")
""")


@pytest.mark.slow
def test_sigkill_at_any_moment_leaves_a_loadable_checkpoint(data_dir: Path, tmp_path: Path) -> None:
    """Kill -9 the training process at random moments (several inside a save): the newest
    checkpoint always loads with its training state, and --resume auto carries on from it."""
    import yaml

    cfg = tiny_config_dict(data_dir, tmp_path / "runs", run_name="killed", training={"max_steps": 500},
                           checkpointing={"save_interval": 1, "keep_last": 2}, logging={"log_interval": 50})
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    driver = tmp_path / "driver.py"
    driver.write_text(SLOW_SAVE_DRIVER)
    ckpts = tmp_path / "runs/pretrain/killed/checkpoints"
    rng = random.Random(0)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    kills, mid_save, last_step = 0, 0, 0
    while kills < 3 or mid_save < 1:
        assert kills < 8, f"no kill landed inside a save in {kills} tries"
        proc = subprocess.Popen([sys.executable, str(driver), "--config_path", str(cfg_path), "--resume", "auto"],
                                cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.time() + 120
        # wait for this process to write its first new checkpoint, then kill it at a random moment
        while (latest := latest_checkpoint(ckpts)) is None or int(latest.name[5:]) <= last_step:
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.time() < deadline, "no checkpoint written"
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 1.2))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
        mid_save += any(ckpts.glob(".tmp-*"))  # a half-written temp dir: killed inside a save
        latest = latest_checkpoint(ckpts)
        ckpt = load_checkpoint(latest, load_training_state=True)
        step = ckpt.training_state["step"]
        assert step == int(latest.name[5:]) and step > last_step  # progress kept across kills
        assert set(ckpt.state_dict) and ckpt.training_state["optimizer"]["state"]
        last_step = step


def test_resume_is_exact_with_prefetching_workers(data_dir: Path, tmp_path: Path) -> None:
    """data.num_workers=2 (batches built ahead in threads, issue 14 defect 7): a run stopped and
    resumed gives the losses of a straight run without prefetching, bit for bit — the saved data
    position is the batches trained on, not the batches built."""
    n = 5
    common = dict(training={"max_steps": 2 * n, "eval_interval": 100, "warmup_steps": 2},
                  checkpointing={"save_interval": 100})
    pretrain.train(tiny_config(data_dir, tmp_path / "runs", run_name="plain", **common))
    ahead = dict(common, data={"num_workers": 2})
    pretrain.train(tiny_config(data_dir, tmp_path / "runs", run_name="ahead", **ahead), stop_at=n)
    pretrain.train(tiny_config(data_dir, tmp_path / "runs", run_name="ahead", **ahead), resume="auto")
    a, b = _losses(tmp_path / "runs/pretrain/plain"), _losses(tmp_path / "runs/pretrain/ahead")
    assert sorted(a) == sorted(b) == list(range(1, 2 * n + 1))
    assert [a[s] for s in a] == [b[s] for s in a]

    from data_pipeline.loader import Prefetcher
    from trainer_fixtures import make_trainer

    cfg = tiny_config(data_dir, tmp_path / "runs", run_name="probe", **ahead)
    train_data, _, _ = pretrain.build_loaders(cfg, 0, 1, None)
    trainer = make_trainer(cfg, build_model(cfg.model), train_data, tmp_path)
    assert isinstance(trainer.train_data, Prefetcher) and trainer.train_data.loader is train_data
    trainer.train_data.close()
