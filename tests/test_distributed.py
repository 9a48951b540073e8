"""trainer.distributed: single-process behaviour, activation checkpointing, and real 2-process
gloo runs under torchrun (DDP and FSDP2) that must reproduce a single process exactly."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from dist_scripts.train_tiny import parser as tiny_parser
from dist_scripts.train_tiny import run as run_tiny
from model import build_model, get_preset
from trainer.distributed import (
    DistInfo,
    all_reduce_mean,
    all_reduce_sum,
    barrier,
    broadcast_object,
    full_state_dict,
    init_distributed,
    load_full_optimizer_state_dict,
    load_full_state_dict,
    no_sync_context,
    unwrap,
    wrap_model,
)
from trainer.optim import build_optimizer
from utils.config import TrainingConfig
from utils.errors import UserError
from utils.paths import REPO_ROOT

SCRIPT = Path(__file__).parent / "dist_scripts" / "train_tiny.py"
MOE_ARGS = ["--preset", "tiny-deepseek_v3", "--optimizer", "muon", "--steps", "4", "--global_batch", "8"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(script: Path, args: list[str], nproc: int = 2, timeout: float = 240) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node=nproc script args` on CPU (gloo), one thread per rank."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           f"--master_port={_free_port()}", str(script), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _single() -> DistInfo:
    return DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), is_distributed=False)


# ---------------------------------------------------------------- one process
def test_single_process_init_and_collectives_are_no_ops(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    info = init_distributed("cpu")
    assert info == _single() and info.is_main
    t = torch.tensor([1.0, 2.0])
    assert all_reduce_sum(t) is t and torch.equal(all_reduce_mean(t), torch.tensor([1.0, 2.0]))
    assert broadcast_object({"a": 1}) == {"a": 1}
    barrier()


def test_torchrun_env_errors_are_user_errors(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(UserError, match="RANK"):
        init_distributed("cpu")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(UserError, match="mps"):
        init_distributed("mps")


def test_wrap_single_process_unwrap_and_state_dict_round_trip():
    model = build_model(get_preset("tiny"))
    assert wrap_model(model, _single(), TrainingConfig()) is model
    compiled = torch.compile(model)  # wrapping only: nothing is compiled until it is called
    assert unwrap(compiled) is model
    sd = full_state_dict(compiled)
    assert set(sd) == set(model.state_dict()) and all(v.device.type == "cpu" for v in sd.values())
    other = build_model(get_preset("tiny"))
    load_full_state_dict(other, sd)
    tokens = torch.randint(0, 256, (2, 8))
    torch.testing.assert_close(other(tokens), model(tokens), rtol=0, atol=0)
    with no_sync_context(compiled, is_last_microbatch=False):
        pass


def test_activation_checkpointing_same_grads_recomputes_and_keeps_names():
    torch.manual_seed(0)
    cfg = get_preset("tiny-deepseek_v3", dropout=0.1)  # dropout: the recompute must replay the same RNG
    plain = build_model(cfg)
    ckpt = build_model(cfg)
    ckpt.load_state_dict(plain.state_dict())
    names = [n for n, _ in ckpt.named_parameters()]
    wrap_model(ckpt, _single(), TrainingConfig(activation_checkpointing=True))
    assert [n for n, _ in ckpt.named_parameters()] == names and set(ckpt.state_dict()) == set(plain.state_dict())
    assert type(ckpt.layers[0]).__name__ == "CheckpointedBlock"

    calls = {"n": 0}
    ckpt.layers[0].attn.register_forward_hook(lambda *_: calls.__setitem__("n", calls["n"] + 1))
    tokens = torch.randint(0, 256, (2, 12))
    losses = []
    for model in (plain, ckpt):
        torch.manual_seed(1)
        logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        losses.append(loss)
    assert calls["n"] == 2  # forward + recompute in backward
    torch.testing.assert_close(losses[0], losses[1], rtol=0, atol=0)
    for (n, a), b in zip(plain.named_parameters(), ckpt.parameters()):
        if a.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-7, msg=n)


# ---------------------------------------------------------------- two processes (gloo, CPU)
@pytest.fixture(scope="module")
def single_reference(tmp_path_factory) -> tuple[dict, Path]:
    """The tiny MoE model trained in this process: global batch 8, no accumulation."""
    out = tmp_path_factory.mktemp("single")
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    result = run_tiny(_single(), tiny_parser().parse_args([*MOE_ARGS, "--out", str(out)]))
    torch.set_num_threads(prev)
    return result, out


def _assert_same_run(got: dict, ref: dict) -> None:
    assert got["world_size"] == 2
    assert max(abs(a - b) for a, b in zip(got["losses"], ref["losses"])) <= 1e-5, (got["losses"], ref["losses"])
    assert got["moe"].keys() == ref["moe"].keys() and len(ref["moe"]) == 2
    for name in ref["moe"]:
        # expert counts summed over both ranks == the single process's counts of the whole batch
        assert got["moe"][name]["counts"] == ref["moe"][name]["counts"], name
        assert got["moe"][name]["bias"] == pytest.approx(ref["moe"][name]["bias"], abs=1e-7), name
    assert sum(ref["moe"]["layers.1.ffn"]["counts"]) == 8 * 16 * 2  # tokens × top-k
    torch.testing.assert_close(torch.tensor(got["probe_logits"]), torch.tensor(ref["probe_logits"]), rtol=0, atol=1e-4)


@pytest.mark.slow
def test_ddp_two_processes_match_one_process(tmp_path, single_reference):
    ref, _ = single_reference
    # 2 ranks × 2 micro-batches of 2 rows (no_sync on the first) == 1 process × 8 rows
    torchrun(SCRIPT, [*MOE_ARGS, "--parallelism", "ddp", "--grad_accum", "2", "--out", str(tmp_path)])
    _assert_same_run(json.loads((tmp_path / "result.json").read_text()), ref)


@pytest.mark.slow
def test_fsdp_two_processes_match_and_checkpoint_loads_in_one_process(tmp_path, single_reference):
    ref, ref_dir = single_reference
    # FSDP2 + activation checkpointing + Muon on sharded DTensors (gather → orthogonalise → reshard)
    torchrun(SCRIPT, [*MOE_ARGS, "--parallelism", "fsdp", "--activation_checkpointing", "--out", str(tmp_path)])
    got = json.loads((tmp_path / "result.json").read_text())
    _assert_same_run(got, ref)

    # the unsharded checkpoint loads into a plain single-process model: same logits
    cfg = get_preset("tiny-deepseek_v3", mtp_depth=0)
    model = build_model(cfg)
    load_full_state_dict(model, load_file(str(tmp_path / "model.safetensors")))
    probe = torch.tensor(got["probe_logits"])
    from dist_scripts.train_tiny import batches

    tokens = batches(1, 2, 16, cfg.vocab_size)[0][:, :-1]
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), probe, rtol=0, atol=1e-5)

    # the unsharded optimizer state equals the single process's and loads into a plain optimizer
    sharded_opt = torch.load(tmp_path / "optim.pt", weights_only=True)
    single_opt = torch.load(ref_dir / "optim.pt", weights_only=True)
    assert sharded_opt["state"].keys() == single_opt["state"].keys()
    for name, st in single_opt["state"].items():
        for key, value in st.items():
            torch.testing.assert_close(sharded_opt["state"][name][key], value, rtol=1e-4, atol=1e-6,
                                       msg=f"{name}.{key}")
    opt = build_optimizer(model, TrainingConfig(optimizer="muon"))
    load_full_optimizer_state_dict(model, opt, sharded_opt)
    buf = opt.state[model.layers[1].ffn.experts.gate_proj]["momentum_buffer"]
    torch.testing.assert_close(buf, sharded_opt["state"]["layers.1.ffn.experts.gate_proj"]["momentum_buffer"])


@pytest.mark.slow
def test_pretrain_script_under_torchrun_fsdp_resumes_and_matches_one_process(tmp_path):
    """The real `pretrain/train.py` under torchrun (2 ranks × batch 2, FSDP2, Muon), stopped
    after 3 of 6 steps and resumed with ``--resume auto`` == one process with batch 4 straight
    through: the same train and validation losses in metrics.jsonl and the same final weights."""
    import yaml

    import pretrain.train as pretrain
    from trainer_fixtures import make_pretrain_data, tiny_config_dict
    from utils.checkpoint import load_checkpoint
    from utils.config import ExperimentConfig, validate

    data_dir = make_pretrain_data(tmp_path)
    training = {"max_steps": 6, "eval_interval": 3, "optimizer": "muon", "parallelism": "fsdp"}
    common = dict(checkpointing={"save_interval": 100})
    runs = tmp_path / "runs"
    two = tiny_config_dict(data_dir, runs, run_name="two", training={**training, "batch_size": 2}, **common)
    config = tmp_path / "two.yaml"
    config.write_text(yaml.safe_dump(two))
    torchrun(SCRIPT.parent / "pretrain_until.py", [str(config), "3"])
    torchrun(REPO_ROOT / "pretrain" / "train.py", ["--config_path", str(config), "--resume", "auto"])
    one = tiny_config_dict(data_dir, runs, run_name="one", training={**training, "batch_size": 4}, **common)
    pretrain.train(validate(one, ExperimentConfig))

    def records(name: str) -> list[dict]:
        lines = (runs / "pretrain" / name / "metrics.jsonl").read_text().splitlines()
        return [{k: r[k] for k in ("step", "loss", "val_loss") if k in r} for r in map(json.loads, lines)]

    a, b = records("two"), records("one")
    assert [r.keys() for r in a] == [r.keys() for r in b] and sum("val_loss" in r for r in a) == 2
    assert [r["step"] for r in a if "loss" in r] == [1, 2, 3, 4, 5, 6]
    for ra, rb in zip(a, b):
        for key in ("loss", "val_loss"):
            if key in ra:
                assert abs(ra[key] - rb[key]) <= 1e-5, (ra, rb)
    wa = load_checkpoint(runs / "pretrain/two/checkpoints/final").state_dict
    wb = load_checkpoint(runs / "pretrain/one/checkpoints/final").state_dict
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-5, msg=k)
