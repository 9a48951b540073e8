"""Context parallelism: the ring-attention math by hand, zig-zag sharding, config errors, and
real gloo runs (2 and 4 processes) that must equal single-process attention and training."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
import yaml

from test_distributed import torchrun
from trainer.context_parallel import shard_batch, zigzag_slots
from trainer.distributed import DistInfo, init_parallel
from trainer.ring_attention import active_range, block_attention, block_attention_grads, merge_partials, visibility
from trainer_fixtures import make_pretrain_data, tiny_config_dict
from utils.config import ExperimentConfig, TrainingConfig, load_config, validate
from utils.errors import UserError
from utils.paths import REPO_ROOT

SCRIPTS = REPO_ROOT / "tests" / "dist_scripts"


# ---------------------------------------------------------------- the math, by hand
def test_merge_partials_by_hand():
    # part a: one key, score 0, value 1; part b: one key, score log 3, value 5
    # softmax over both: weights 1/4, 3/4 -> 0.25 * 1 + 0.75 * 5 = 4; lse = log(1 + 3)
    out, lse = merge_partials(torch.tensor([[1.0]]), torch.tensor([0.0]), torch.tensor([[5.0]]),
                              torch.tensor([math.log(3.0)]))
    assert out.item() == pytest.approx(4.0) and lse.item() == pytest.approx(math.log(4.0))
    # an empty part (lse -inf) changes nothing; two empty parts stay empty (0, -inf), never nan
    out, lse = merge_partials(torch.tensor([[2.0]]), torch.tensor([0.7]), torch.zeros(1, 1), torch.tensor([-math.inf]))
    assert out.item() == 2.0 and lse.item() == pytest.approx(0.7)
    out, lse = merge_partials(torch.zeros(1, 1), torch.tensor([-math.inf]), torch.zeros(1, 1),
                              torch.tensor([-math.inf]))
    assert out.item() == 0.0 and lse.item() == -math.inf


def test_block_attention_and_grads_match_autograd():
    torch.manual_seed(0)
    q = torch.randn(2, 2, 3, 5, 8, dtype=torch.float64, requires_grad=True)  # (B, n_kv, G, T, d)
    k = torch.randn(2, 2, 6, 8, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 2, 6, 4, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(2, 1, 1, 5, 6) < 0.6
    mask[..., 0] = True  # every query sees a key
    out, lse = block_attention(q, k, v, 0.3, mask)
    scores = torch.einsum("bhgtd,bhsd->bhgts", q, k) * 0.3
    ref = scores.masked_fill(~mask, -math.inf).softmax(-1) @ v.unsqueeze(2)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(lse, scores.masked_fill(~mask, -math.inf).logsumexp(-1))
    dout = torch.randn_like(out)
    ref.backward(dout)
    dq, dk, dv = block_attention_grads(q, k, v, 0.3, mask, lse.detach(), dout, (dout * out.detach()).sum(-1))
    for mine, theirs in ((dq, q.grad), (dk, k.grad), (dv, v.grad)):
        torch.testing.assert_close(mine, theirs)


def test_zigzag_slots_and_active_range():
    assert zigzag_slots(8, 2, 0).tolist() == [0, 1, 6, 7]
    assert zigzag_slots(8, 2, 1).tolist() == [2, 3, 4, 5]
    every = torch.cat([zigzag_slots(16, 4, r) for r in range(4)])
    assert sorted(every.tolist()) == list(range(16))
    with pytest.raises(UserError, match="divisible by 2 x"):
        zigzag_slots(6, 2, 0)
    mine, other = zigzag_slots(8, 2, 0), zigzag_slots(8, 2, 1)
    # rank 0's first chunk (0, 1) sees nothing of rank 1's; its second (6, 7) sees all of it
    assert active_range(mine, other) == (2, 4)
    # rank 1's queries (2..5) see rank 0's first chunk (0, 1) only
    assert active_range(other, mine) == (0, 2)
    mask = visibility(torch.tensor([2, 3]), torch.tensor([0, 1, 2, 3]), None, None, window=2)
    assert mask[0, 0, 0].tolist() == [[False, True, True, False], [False, False, True, True]]


def test_ring_in_one_process_equals_full_attention():
    """The ring's schedule replayed block by block: zig-zag shards, one merge per step."""
    torch.manual_seed(0)
    cp, seq_len = 4, 16
    q = torch.randn(1, 2, 2, seq_len, 8, dtype=torch.float64)
    k = torch.randn(1, 2, seq_len, 8, dtype=torch.float64)
    v = torch.randn(1, 2, seq_len, 8, dtype=torch.float64)
    docs = torch.tensor([[0] * 5 + [1] * 7 + [2] * 4])
    full = visibility(torch.arange(seq_len), torch.arange(seq_len), docs, docs, None)
    ref, _ = block_attention(q, k, v, 0.5, full)
    for rank in range(cp):
        slots = zigzag_slots(seq_len, cp, rank)
        out = torch.zeros(1, 2, 2, len(slots), 8, dtype=torch.float64)
        lse = torch.full((1, 2, 2, len(slots)), -math.inf, dtype=torch.float64)
        for step in range(cp):
            k_slots = zigzag_slots(seq_len, cp, (rank - step) % cp)
            q0, k1 = active_range(slots, k_slots)
            mask = visibility(slots[q0:], k_slots[:k1], docs[:, slots[q0:]], docs[:, k_slots[:k1]], None)
            keys = k_slots[:k1]
            o_b, l_b = block_attention(q[..., slots[q0:], :], k[..., keys, :], v[..., keys, :], 0.5, mask)
            out[..., q0:, :], lse[..., q0:] = merge_partials(out[..., q0:, :], lse[..., q0:], o_b, l_b)
        torch.testing.assert_close(out, ref[..., slots, :])


def test_shard_batch_keeps_global_positions():
    batch = {"input_ids": torch.arange(8)[None], "labels": torch.arange(1, 9)[None],
             "doc_ids": torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1]])}
    mine = shard_batch(batch, cp=2, rank=1)
    assert mine["input_ids"].tolist() == [[2, 3, 4, 5]] and mine["labels"].tolist() == [[3, 4, 5, 6]]
    assert mine["position_ids"].tolist() == [[2, 0, 1, 2]]  # restarting at the document start (slot 3)
    assert mine["doc_ids"].tolist() == [[0, 1, 1, 1]]


# ---------------------------------------------------------------- bad input
def test_config_errors_are_one_line():
    with pytest.raises(UserError, match=r"sequence length 30 .* not divisible by 2 x training.context_parallel = 4"):
        load_config(None, ExperimentConfig, ["training.context_parallel=2", "data.seq_len=30"])
    with pytest.raises(UserError, match="cannot be combined"):
        load_config(None, ExperimentConfig, ["training.context_parallel=2", "training.pipeline_parallel=2",
                                             "training.grad_accum_steps=2"])
    info = DistInfo(rank=0, world_size=4, local_rank=0, device=torch.device("cpu"), is_distributed=True)
    with pytest.raises(UserError, match="training.context_parallel=3 does not divide the world size 4"):
        init_parallel(info, TrainingConfig(context_parallel=3))


def test_context_parallel_in_one_process_exits_2_with_one_line():
    proc = subprocess.run([sys.executable, "pretrain/train.py", "--config_path", "configs/pretrain/tiny.yaml",
                           "--set", "training.context_parallel=2"], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "error: training.context_parallel=2 does not divide the world size 1 (torchrun --nproc_per_node x nodes)"]


# ---------------------------------------------------------------- many processes (gloo, CPU)
def _assert_ring_matches(out, nproc: int) -> None:
    got = json.loads(out.read_text())
    assert got["world_size"] == nproc
    assert set(got["results"]) == {f"{a}/{m}" for a in ("gqa", "gqa_window", "mla") for m in ("causal", "doc")}
    for name, diffs in got["results"].items():
        assert max(diffs.values()) <= 1e-5, (name, diffs)


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [2, 4])
def test_ring_attention_equals_single_process_attention(tmp_path, nproc):
    """Outputs, input and parameter gradients of GQA, sliding-window GQA and MLA layers,
    causal and document-masked, on 2 and 4 ranks == the whole sequence in one process."""
    torchrun(SCRIPTS / "ring_attention.py", [str(tmp_path / "out.json")], nproc=nproc)
    _assert_ring_matches(tmp_path / "out.json", nproc)


def _records(run) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [{k: r[k] for k in ("step", "loss", "grad_norm", "val_loss") if k in r} for r in map(json.loads, lines)]


def _assert_same_records(a: list[dict], b: list[dict]) -> None:
    assert [r.keys() for r in a] == [r.keys() for r in b] and any("val_loss" in r for r in a)
    for ra, rb in zip(a, b):
        for key in ("loss", "grad_norm", "val_loss"):
            if key in ra:
                assert abs(ra[key] - rb[key]) <= 1e-5, (ra, rb)


@pytest.mark.slow
def test_pretrain_dp2_cp2_fsdp_doc_masked_matches_one_process(tmp_path):
    """`pretrain/train.py` on 4 ranks: FSDP2 over 2 data-parallel x 2 context-parallel ranks,
    document masking (GQA) == one process with the same global batch."""
    import pretrain.train as pretrain
    from utils.checkpoint import load_checkpoint

    data_dir = make_pretrain_data(tmp_path)
    runs = tmp_path / "runs"
    training = {"max_steps": 3, "eval_interval": 3, "batch_size": 2}
    common = dict(data={"doc_masking": True}, checkpointing={"save_interval": 100})
    four = tiny_config_dict(data_dir, runs, run_name="cp", **common,
                            training={**training, "context_parallel": 2, "parallelism": "fsdp"})
    config = tmp_path / "cp.yaml"
    config.write_text(yaml.safe_dump(four))
    torchrun(REPO_ROOT / "pretrain" / "train.py", ["--config_path", str(config)], nproc=4)
    one = tiny_config_dict(data_dir, runs, run_name="one", **common, training={**training, "batch_size": 4})
    pretrain.train(validate(one, ExperimentConfig))
    _assert_same_records(_records(runs / "pretrain" / "cp"), _records(runs / "pretrain" / "one"))
    wa = load_checkpoint(runs / "pretrain/cp/checkpoints/final").state_dict
    wb = load_checkpoint(runs / "pretrain/one/checkpoints/final").state_dict
    for k in wb:  # Adam turns rounding-level gradient differences of near-zero entries into ~lr-sized
        # steps: 3 steps at lr 3e-3 on a sequence split across ranks differ by up to ~1e-5 (measured)
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=3e-5, msg=k)


@pytest.mark.slow
def test_sft_packed_with_context_parallel_matches_one_process(tmp_path):
    """Long-context SFT: `finetune/sft_train.py` with packed rows (document masks) on 2
    context-parallel ranks == one process."""
    from finetune import sft
    from test_sft import config_dict, make_sft_env

    env = make_sft_env(tmp_path)
    runs = tmp_path / "runs"
    training = {"max_steps": 3, "eval_interval": 3, "batch_size": 2}
    two = config_dict(env, runs, "cp", data={"seq_len": 256}, training={**training, "context_parallel": 2},
                      checkpointing={"save_interval": 100})
    config = tmp_path / "cp.yaml"
    config.write_text(yaml.safe_dump(two))
    torchrun(REPO_ROOT / "finetune" / "sft_train.py", ["--config_path", str(config)], nproc=2)
    one = config_dict(env, runs, "one", data={"seq_len": 256}, training=training, checkpointing={"save_interval": 100})
    sft.train(validate(one, sft.SFTConfig), "full")
    _assert_same_records(_records(runs / "sft" / "cp"), _records(runs / "sft" / "one"))
