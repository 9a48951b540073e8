"""Online RL end to end on tiny models: rollouts through the paged engine (log-probs equal the
training forward's, a group shares its prompt's prefill), every algorithm trains and logs its
metrics, runs resume exactly mid-rollout, 2-process DDP equals 1 process, GSM8K runs end to end,
and user mistakes exit 2 with one line.

The pure losses are checked by hand in test_rl_losses.py and against TRL in
test_rl_trl_parity.py; the rewards in test_rl_rewards.py.
"""
from __future__ import annotations

import contextlib

import json
from pathlib import Path

import pytest
import torch
import yaml
from tokenizers import Tokenizer

from align import rl_stage
from align.rl_config import RLConfig
from align.rl_data import Sample, completion_batch, encode_prompts, pack_rows, read_prompts
from align.rollout import Generator, completion_logps
from conftest import REPO_ROOT, assert_user_error, run_script
from data_pipeline.chat import ChatTokenizer
from finetune.base_model import build_sft_model
from inference.engine.llm_engine import LLMEngine
from inference.engine.loading import LoadedModel
from inference.engine.sampling import SamplingParams
from rl_fixtures import RLEnv, make_rl_env, rl_config, rl_dict
from test_distributed import torchrun
from test_sft import make_base, one_thread  # noqa: F401 (autouse fixture)
from utils.checkpoint import load_checkpoint
from utils.errors import UserError


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> RLEnv:
    return make_rl_env(tmp_path_factory.mktemp("rl"))


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def train_records(run: Path) -> list[dict]:
    return [r for r in metrics(run) if "loss" in r]


def run_dir(runs: Path, name: str) -> Path:
    return runs / "rl" / name


def _policy_and_tokenizer(env: RLEnv, cfg: RLConfig):
    source, method = rl_stage.prepare(cfg)
    policy = build_sft_model(source, cfg, method, torch.device("cpu"), torch.float32)
    file = env.data_dir / "tokenizer" / "tokenizer.json"
    ct = ChatTokenizer.wrap(Tokenizer.from_file(str(file)))
    path = env.data_dir / "prompts" / "rl_prompts.jsonl"
    prompts = encode_prompts(read_prompts(path), ct, 100, path)
    return policy, Tokenizer.from_file(str(file)), file, ct, prompts


# ---------------------------------------------------------------------------- rollouts
@pytest.mark.parametrize("share_prompts", [True, False])
def test_engine_sampling_logprobs_equal_the_training_forward(env: RLEnv, tmp_path: Path, share_prompts: bool) -> None:
    """Two samples of each of 3 prompts: the engine's sampling log-probs equal the training
    forward's (`completion_logps`), with a prompt packed once for its samples or once per sample."""
    cfg = rl_config(env, tmp_path, "lp")
    policy, tok, file, ct, prompts = _policy_and_tokenizer(env, cfg)
    engine = LLMEngine(LoadedModel(policy, cfg.model, tok, file, ct.im_end_id), max_num_seqs=8)
    temperature = 0.7
    rows = []
    for i, p in enumerate(prompts[:3]):
        for j in range(2):
            rid = engine.add_request(p.ids, SamplingParams(temperature=temperature, seed=10 * i + j, max_tokens=10,
                                                           logprobs=0, ignore_eos=True))
            rows.append((rid, p))
    got: dict[str, tuple[list[int], list[float]]] = {rid: ([], []) for rid, _ in rows}
    while engine.has_unfinished():
        for out in engine.step():
            got[out.request_id][0].extend(out.new_token_ids)
            got[out.request_id][1].extend(lp for _, lp, _ in out.logprobs)
    samples = [Sample(p, got[rid][0], "", "length") for rid, p in rows]
    batch = completion_batch(samples)
    batch.update(pack_rows(samples, ct.pad_id, share_prompts))
    assert batch["input_ids"].shape[0] == (3 if share_prompts else 6)
    with torch.no_grad():
        train_lps, _, _ = completion_logps(policy, batch, temperature)  # (S, L)
    engine_lps = torch.tensor([got[rid][1] for rid, _ in rows])  # (S, 10)
    assert batch["mask"].all() and train_lps.shape == engine_lps.shape == (6, 10)
    assert torch.allclose(train_lps, engine_lps, atol=1e-4), (train_lps - engine_lps).abs().max()


@pytest.mark.parametrize("algorithm", ["grpo", "gspo", "ppo"])
def test_a_shared_prompt_trains_exactly_as_one_row_per_sample(env: RLEnv, tmp_path: Path, algorithm: str) -> None:
    """The policy loss (PPO: with the critic's value loss), its logged statistics and every
    gradient are the same whether a group's prompt is packed once (``rl.share_prompts``) or
    repeated in one row per sample."""
    from align.rl_objectives import ActorCritic, PolicyGradientObjective, PPOObjective

    rl = {"algorithm": algorithm, "kl_coef": 0.1, "kl_penalty": "loss"} if algorithm == "ppo" else \
        {"algorithm": algorithm, "beta": 0.1}
    cfg = rl_config(env, tmp_path, "pack", rl=rl)
    policy, tok, file, ct, prompts = _policy_and_tokenizer(env, cfg)
    model, objective = policy, PolicyGradientObjective(cfg.rl)
    if algorithm == "ppo":
        source, _ = rl_stage.prepare(cfg)
        value = build_sft_model(source, cfg, "full", torch.device("cpu"), torch.float32, reward=True)
        model, objective = ActorCritic(policy, value), PPOObjective(cfg.rl)
    g = torch.Generator().manual_seed(0)
    samples = [Sample(p, torch.randint(5, 200, (int(n),), generator=g).tolist(), "", "stop")
               for p in prompts[:2] for n in torch.randint(1, 9, (3,), generator=g)]  # 2 groups of 3, ragged
    batch = completion_batch(samples)
    batch["mask"][1, 0] = 0.0  # a token left out of the loss (a masked first token: the prompt's position)
    shape = batch["mask"].shape
    batch["advantages"] = torch.randn(len(samples) if algorithm != "ppo" else shape, generator=g)
    batch["ref_logps"] = -torch.rand(shape, generator=g)
    if algorithm == "ppo":
        batch.update(old_logps=-torch.rand(shape, generator=g), old_values=torch.randn(shape, generator=g),
                     returns=torch.randn(shape, generator=g))
    results = []
    for share in (True, False):
        model.zero_grad()
        out = objective(model, {**batch, **pack_rows(samples, ct.pad_id, share)})
        out.loss_sum.backward()
        results.append((out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (shared, g_shared), (rows, g_rows) = results
    assert torch.allclose(shared.loss_sum, rows.loss_sum, atol=1e-6) and shared.n_tokens == rows.n_tokens
    for k in rows.sums:
        assert torch.allclose(shared.sums[k], rows.sums[k], rtol=1e-5, atol=1e-5), k
    assert g_shared.keys() == g_rows.keys() and len(g_rows) > 4
    assert algorithm != "ppo" or any(n.startswith("value.") for n in g_rows)
    for name in g_rows:  # fp32 summation order differs: relative to the gradient's size
        scale = g_rows[name].abs().max().clamp(min=1e-3)
        assert (g_shared[name] - g_rows[name]).abs().max() <= 1e-5 * scale, name


def test_a_group_shares_its_prompt_prefill(env: RLEnv, tmp_path: Path) -> None:
    cfg = rl_config(env, tmp_path, "prefix")
    policy, tok, file, ct, prompts = _policy_and_tokenizer(env, cfg)
    gen = Generator(policy, cfg.model, tok, file, ct, cfg.rl, max_num_seqs=32)
    computed = []
    forward = gen.engine.runner.forward

    def counting(rows, logits="last", **kwargs):
        if any(len(r.token_ids) > 1 for r in rows):  # a prefill step
            computed.append(sum(len(r.token_ids) for r in rows))
        return forward(rows, logits, **kwargs)

    gen.engine.runner.forward = counting
    chosen = prompts[:3]
    groups = gen.generate(chosen, 4, [[10 * i + j for j in range(4)] for i in range(3)])
    assert [len(g) for g in groups] == [4, 4, 4] and all(s.completion_ids for g in groups for s in g)
    full = 4 * sum(len(p.ids) for p in chosen)
    block = gen.engine.scheduler.block_manager.block_size
    shared = sum(len(p.ids) // block * block for p in chosen)  # full blocks of each prompt
    assert sum(computed) == full - 3 * shared  # samples 2..G computed only past the cached blocks
    # distinct seeds → distinct samples; the same seeds → the same samples (after a cache reset)
    again = gen.generate(chosen, 4, [[10 * i + j for j in range(4)] for i in range(3)])
    assert [[s.completion_ids for s in g] for g in again] == [[s.completion_ids for s in g] for g in groups]
    assert len({tuple(s.completion_ids) for s in groups[0]}) > 1


# ---------------------------------------------------------------------------- training runs
def test_grpo_trains_logs_and_plots(env: RLEnv, tmp_path: Path) -> None:
    cfg = rl_config(env, tmp_path, "grpo", rl={"beta": 0.05, "epsilon_high": 0.28},
                    training={"max_steps": 4, "eval_interval": 2})
    summary = rl_stage.train(cfg)
    run = run_dir(tmp_path, "grpo")
    records = train_records(run)
    assert len(records) == 4
    for key in ("reward", "reward_std", "rewards/letter_reward", "kl", "clip_ratio/region", "entropy",
                "completion_length", "time/rollout_s"):
        assert key in records[-1], key
    assert records[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # the first update starts at the reference
    assert records[-1]["kl"] > 0
    vals = [r for r in metrics(run) if "val_reward" in r]
    assert [r["step"] for r in vals] == [0, 2, 4]  # the baseline, then every eval_interval
    assert (run / "reward.png").is_file() and (run / "loss.png").is_file()
    assert cfg.rl.reference == "frozen"
    assert all(r["time/val_s"] > 0 for r in vals)
    assert cfg.training.spike_threshold == float("inf")  # the surrogate's value is no health signal: finiteness only
    final = load_checkpoint(summary["final_checkpoint"])
    assert "lm_head.weight" in final.state_dict or "embed.weight" in final.state_dict


@pytest.mark.parametrize("rl", [
    {"algorithm": "gspo"},
    {"algorithm": "grpo", "scale_rewards": "batch", "loss_aggregation": "sequence_mean", "num_iterations": 2},
    {"algorithm": "grpo", "scale_rewards": "none", "loss_aggregation": "dr_grpo", "dynamic_sampling": True},
    {"algorithm": "ppo", "kl_coef": 0.05, "ppo_epochs": 2, "num_minibatches": 2},
    {"algorithm": "ppo", "kl_coef": 0.05, "kl_penalty": "loss"},
    {"algorithm": "rft", "min_reward": 0.1, "steps_per_round": 2},
], ids=lambda s: "-".join(str(v) for v in s.values()))
def test_every_algorithm_trains(env: RLEnv, tmp_path: Path, rl: dict) -> None:
    cfg = rl_config(env, tmp_path, "algo", rl=rl, training={"max_steps": 4})
    summary = rl_stage.train(cfg)
    records = train_records(run_dir(tmp_path, "algo"))
    assert len(records) == 4 and all(torch.isfinite(torch.tensor([r["loss"] for r in records])))
    assert all("reward" in r for r in records[:: cfg.rl.updates_per_rollout])
    final = load_checkpoint(summary["final_checkpoint"])
    assert not any(k.startswith(("policy.", "value.")) for k in final.state_dict)  # PPO: the policy alone
    if rl["algorithm"] == "ppo":
        assert "vf_loss" in records[-1]
    if rl["algorithm"] == "rft":
        assert "rft/kept_frac" in records[0]
    if rl.get("dynamic_sampling"):
        assert "dynamic/dropped_groups_frac" in records[0]


HYBRID = {"layer_types": ["mamba", "full"], "mamba_head_dim": 16, "mamba_state_size": 16, "mamba_chunk_size": 16}


@pytest.mark.parametrize("rl, model", [({"algorithm": "grpo", "beta": 0.05, "num_iterations": 2}, None),
                                       ({"algorithm": "ppo", "kl_coef": 0.05}, None),
                                       ({"algorithm": "ppo", "kl_coef": 0.05}, HYBRID)],
                         ids=["grpo", "ppo", "ppo-mamba-hybrid"])
def test_micro_batches_of_different_widths_make_one_rollout(env: RLEnv, tmp_path: Path, rl: dict,
                                                            model: dict | None) -> None:
    """A stop string ends completions at different lengths, so the no-grad passes (old-policy and
    reference log-probs, PPO's values) run over micro-batches of different widths; their columns
    are joined into the rollout's (S, L) (the README's PPO command once crashed here). A policy
    with Mamba-2 layers takes the one-row-per-sample layout."""
    from align.rollout import batched_logps

    base = env.base if model is None else make_base(tmp_path / "hybrid", env.data_dir / "tokenizer",
                                                     max_seq_len=128, **model)
    cfg = rl_config(env, tmp_path, "ragged", rl={**rl, "sampling": {"max_new_tokens": 12, "stop": ["a"]}},
                    training={"max_steps": 2, "eval_interval": 2, "batch_size": 4},
                    checkpointing={"init_from": str(base)})
    rl_stage.train(cfg)
    records = train_records(run_dir(tmp_path, "ragged"))
    assert len(records) == 2 and 1 < records[0]["completion_length"] < 12 and records[0]["truncated_frac"] < 1
    assert records[0]["reward_std"] > 0  # the letter reward still varies (the stop string is not its letter)
    # the joined columns equal one pass over every sample
    policy, tok, file, ct, prompts = _policy_and_tokenizer(env, cfg)
    g = torch.Generator().manual_seed(1)
    samples = [Sample(prompts[i // 3], torch.randint(5, 200, (n,), generator=g).tolist(), "", "stop")
               for i, n in enumerate([2, 7, 3, 1, 2, 2])]
    batch = completion_batch(samples)
    share = model is None  # Mamba-2 layers: one row per sample
    whole = batched_logps(policy, [{**batch, **pack_rows(samples, ct.pad_id, share)}], 1.0, contextlib.nullcontext)
    micros = [{"completion": batch["completion"][i:i + 3, :w], "mask": batch["mask"][i:i + 3, :w],
               **pack_rows(samples[i:i + 3], ct.pad_id, share)} for i, w in ((0, 7), (3, 2))]
    parts = batched_logps(policy, micros, 1.0, contextlib.nullcontext)
    assert parts.shape == whole.shape == (6, 7) and torch.allclose(parts, whole, atol=1e-6)


def test_lora_grpo_with_the_adapters_off_reference(env: RLEnv, tmp_path: Path) -> None:
    cfg = rl_config(env, tmp_path, "lora", rl={"beta": 0.1}, lora={"r": 4, "alpha": 8.0},
                    training={"max_steps": 2, "eval_interval": 2})
    summary = rl_stage.train(cfg)
    assert cfg.rl.reference == "adapters_off"
    assert (summary["final_checkpoint"] / "adapter_model.safetensors").is_file()
    assert "kl" in train_records(run_dir(tmp_path, "lora"))[-1]


def _trace(run: Path) -> list[tuple]:
    return [(r["step"], r["loss"], r.get("reward"), r["grad_norm"]) for r in train_records(run)]


def test_dynamic_sampling_refills_what_the_shortfall_needs() -> None:
    """A refill asks for ceil(short / share of groups kept so far) prompts per rank, a whole
    number per rank, at most one prompt batch (the share floored at 0.1)."""
    from align.rollout import RolloutSource
    from trainer.distributed import DistInfo

    src = RolloutSource.__new__(RolloutSource)
    src.dist = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), is_distributed=False)
    pool = [(None, None, None, torch.tensor([True] * 10 + [False] * 6))]  # 10 of 16 groups kept
    assert src._refill_size(6, pool, 16) == 10  # 6 / 0.625 = 9.6
    assert src._refill_size(1, pool, 16) == 2  # 1.6
    assert src._refill_size(6, pool * 2, 16) == 10  # the share over the whole pool
    nothing = [(None, None, None, torch.zeros(16, dtype=torch.bool))]
    assert src._refill_size(16, nothing, 16) == 16  # 160 wanted: one batch at most
    assert src._refill_size(1, nothing, 16) == 10  # 1 / 0.1
    src.dist = DistInfo(rank=1, world_size=2, local_rank=1, device=torch.device("cpu"), is_distributed=False)
    assert src._refill_size(3, pool, 16) == 10  # 5 per rank
    assert src._refill_size(6, pool, 16) == 16 and src._refill_size(6, pool, 7) == 8  # at most 8 per rank


def test_prompts_whose_groups_had_equal_rewards_are_passed_over() -> None:
    """skip_zero_variance = s passes over a prompt with a run of z equal-reward groups with
    probability 1 - (1 - s)^z (seeded per stream position); ranks split the same taken list; one
    pass over the prompts at most; a learnable group resets the run."""
    from types import SimpleNamespace

    from align.rl_data import PromptRecord
    from align.rollout import RolloutSource
    from trainer.distributed import DistInfo

    def source(rank: int = 0, world: int = 1, streak: dict | None = None) -> RolloutSource:
        src = RolloutSource.__new__(RolloutSource)
        src.rl, src.seed, src.cursor, src.passed_over = SimpleNamespace(skip_zero_variance=0.5), 0, 0, 0
        src.prompts = [PromptRecord(i, {}, [i]) for i in range(10)]
        src.zero_streak = dict(streak or {})
        src.dist = DistInfo(rank=rank, world_size=world, local_rank=rank, device=torch.device("cpu"),
                            is_distributed=False)
        return src

    plain = source()
    assert [p.index for p in plain._take_prompts(4)[0]] == [0, 1, 2, 3] and plain.passed_over == 0
    streak = {1: 40, 3: 40, 4: 1}  # 1 and 3: passed over for sure; 4: a coin flip
    one = source(streak=streak)
    taken = [p.index for p in one._take_prompts(6)[0]]
    assert 1 not in taken and 3 not in taken and taken[:2] == [0, 2]
    assert one.passed_over == one.cursor - len(taken) and one.passed_over in (2, 3)
    two = [source(r, 2, streak) for r in range(2)]
    parts = [s._take_prompts(6) for s in two]
    assert sorted(p.index for part in parts for p in part[0]) == sorted(taken)
    assert [t for part in parts for t in part[2]] == [0, 2, 4, 1, 3, 5] and two[0].cursor == two[1].cursor == one.cursor
    stuck = source(streak={i: 60 for i in range(10)})  # everything "solved": one pass, then take anyway
    assert len(stuck._take_prompts(3)[0]) == 3 and stuck.passed_over == 10
    # the record: an equal-reward group extends the run, a learnable one ends it
    prompts, _, at = plain._take_prompts(3)
    plain.zero_streak = {prompts[0].index: 2, prompts[1].index: 2}
    plain._count_zero_variance(3, prompts, at, torch.tensor([True, False, True]))
    assert plain.zero_streak == {prompts[0].index: 3, prompts[2].index: 1}


def test_resume_mid_rollout_is_exact(env: RLEnv, tmp_path: Path) -> None:
    rl = {"num_iterations": 2, "beta": 0.05}
    training = {"max_steps": 5, "eval_interval": 5}
    straight = rl_config(env, tmp_path / "a", "r", rl=rl, training=training)
    rl_stage.train(straight)
    pieces = rl_config(env, tmp_path / "b", "r", rl=rl, training=training)
    rl_stage.train(pieces, stop_at=3)  # step 3 is the first of rollout 2's two updates
    resumed = rl_config(env, tmp_path / "b", "r", rl=rl, training=training)
    rl_stage.train(resumed, resume="auto")
    a, b = run_dir(tmp_path / "a", "r"), run_dir(tmp_path / "b", "r")
    assert _trace(a) == _trace(b)
    wa = load_checkpoint(a / "checkpoints" / "final").state_dict
    wb = load_checkpoint(b / "checkpoints" / "final").state_dict
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.slow
def test_ddp_two_processes_equal_one(env: RLEnv, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).parent))  # the letter reward's module
    rl = {"beta": 0.05, "scale_rewards": "batch", "prompts_per_step": 4, "skip_zero_variance": 0.5}
    training = {"max_steps": 3, "eval_interval": 3, "batch_size": 4}
    one = rl_config(env, tmp_path / "one", "d", rl=rl, training=training)
    rl_stage.train(one)
    cfg = rl_dict(env, tmp_path / "two", "d", rl=rl, training=training)
    path = tmp_path / "ddp.yaml"
    path.write_text(yaml.safe_dump(cfg))
    torchrun(REPO_ROOT / "align" / "train_online.py", ["--config_path", str(path)], timeout=400)
    a, b = train_records(run_dir(tmp_path / "one", "d")), train_records(run_dir(tmp_path / "two", "d"))
    for x, y in zip(a, b, strict=True):
        assert x["reward"] == pytest.approx(y["reward"], abs=1e-6)  # the same samples on 1 and 2 ranks
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-4, abs=1e-6)
        assert x["kl"] == pytest.approx(y["kl"], rel=1e-3, abs=1e-7)
    va = [r["val_reward"] for r in metrics(run_dir(tmp_path / "one", "d")) if "val_reward" in r]
    vb = [r["val_reward"] for r in metrics(run_dir(tmp_path / "two", "d")) if "val_reward" in r]
    assert va == pytest.approx(vb, abs=1e-6)


@pytest.mark.slow
def test_gsm8k_end_to_end(env: RLEnv, tmp_path: Path) -> None:
    """GSM8K prompts from ../shared/data through download_prompts.py, then GRPO with the verifiable
    reward: rewards computed (a tiny model scores ~0), no crash."""
    gsm8k = REPO_ROOT.parent / "shared" / "data" / "gsm8k" / "train.jsonl"
    if not gsm8k.is_file():
        pytest.skip("../shared/data/gsm8k is not here")
    data = tmp_path / "data"
    data.mkdir()
    (data / "tokenizer").symlink_to(env.data_dir / "tokenizer")
    proc = run_script(["data_pipeline/download/download_prompts.py", "--source", "local", "--input", str(gsm8k),
                       "--max_prompts", "40", "--builtin_prompts", "0", "--data_dir", str(data)])
    assert proc.returncode == 0, proc.stderr
    base = make_base(tmp_path / "base", env.data_dir / "tokenizer", max_seq_len=384)
    cfg = rl_config(env, tmp_path, "gsm8k", rl={"rewards": [{"type": "verifiable"}, {"type": "format", "weight": 0.1}],
                                                  "sampling": {"max_new_tokens": 24}},
                    data={"data_dir": str(data)}, checkpointing={"init_from": str(base)},
                    training={"max_steps": 2, "eval_interval": 2})
    rl_stage.train(cfg)
    records = train_records(run_dir(tmp_path, "gsm8k"))
    assert len(records) == 2 and "rewards/verifiable" in records[0] and "rewards/format" in records[0]


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["grpo", "gspo", "ppo", "rft"])
def test_online_rl_raises_the_held_out_reward(env: RLEnv, tmp_path: Path, algorithm: str) -> None:
    """Each algorithm raises the held-out reward (the letter reward: a random tiny policy spreads
    it, so the signal is there from step one)."""
    rl = {"algorithm": algorithm, "val_prompts": 16, "prompts_per_step": 4, "group_size": 8}
    rl.update({"ppo": {"kl_coef": 0.0, "ppo_epochs": 2}, "rft": {"min_reward": 0.15, "steps_per_round": 2},
               "gspo": {"epsilon": 0.02, "epsilon_high": 0.03}}.get(algorithm, {}))
    steps = {"ppo": 72, "rft": 48, "grpo": 40}.get(algorithm, 24)  # two updates per rollout (PPO: its critic starts untrained)
    cfg = rl_config(env, tmp_path, algorithm, rl=rl,
                    training={"max_steps": steps, "eval_interval": steps, "learning_rate": 3e-3, "batch_size": 16})
    rl_stage.train(cfg)
    vals = [r["val_reward"] for r in metrics(run_dir(tmp_path, algorithm)) if "val_reward" in r]
    assert vals[-1] > vals[0] + 0.05, vals


# ---------------------------------------------------------------------------- user mistakes
def _cli(tmp_path: Path, cfg: dict):
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return run_script(["align/train_online.py", "--config_path", str(path)])


def test_bad_prompts_file_exits_2(env: RLEnv, tmp_path: Path) -> None:
    cfg = rl_dict(env, tmp_path, "bad", rl={"prompts": str(tmp_path / "missing.jsonl")})
    assert_user_error(_cli(tmp_path, cfg), "RL prompts file not found")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "answer": "1"}\n{"prompt": 3}\n')
    cfg = rl_dict(env, tmp_path, "bad", rl={"prompts": str(bad)})
    assert_user_error(_cli(tmp_path, cfg), f"{bad}:2")
    bad.write_text('{"prompt": "a", "answer": "1"}\nnot json\n')
    assert_user_error(_cli(tmp_path, cfg), f"{bad}:2: not valid JSON")


@pytest.mark.parametrize("rl, message", [
    ({"group_size": 1}, "G >= 2"),
    ({"rewards": [{"type": "magic"}]}, "rl.rewards.0.type"),
    ({"epsilon": 0.2, "epsilon_high": 0.1}, "epsilon_high"),
    ({"gamma": 0.9}, "rl.gamma belongs to ppo"),
], ids=["G<2", "unknown-reward", "epsilon_high<epsilon", "other-algorithm-key"])
def test_bad_config_exits_2(env: RLEnv, tmp_path: Path, rl: dict, message: str) -> None:
    assert_user_error(_cli(tmp_path, rl_dict(env, tmp_path, "bad", rl=rl)), message)


def test_reward_model_with_another_tokenizer_exits_2(env: RLEnv, tmp_path: Path) -> None:
    from model import get_preset
    from test_reward_model import _random_reward_model
    from utils.checkpoint import REWARD_MODEL, save_checkpoint

    doc = json.loads((env.data_dir / "tokenizer" / "tokenizer.json").read_text())
    vocab = dict(doc["model"]["vocab"])
    a, b = sorted(t for t in vocab if t.isalpha() and len(t) > 3)[:2]
    vocab[a], vocab[b] = vocab[b], vocab[a]  # two ids swapped: another tokenizer
    cfg = get_preset("tiny-llama3", vocab_size=1024, max_seq_len=128)
    rm = tmp_path / "rm"
    save_checkpoint(rm, _random_reward_model(cfg).state_dict(), {**cfg.model_dump(mode="json"), "task": REWARD_MODEL},
                    tokenizer_dir=env.data_dir / "tokenizer")
    (rm / "tokenizer.json").write_text(json.dumps({**doc, "model": {**doc["model"], "vocab": vocab}}))
    cfg_ = rl_dict(env, tmp_path, "bad", rl={"rewards": [{"type": "reward_model", "checkpoint": str(rm)}]})
    assert_user_error(_cli(tmp_path, cfg_), "tokenizer")


def test_fsdp_is_refused(env: RLEnv, tmp_path: Path) -> None:
    cfg = rl_config(env, tmp_path, "fsdp", training={"parallelism": "fsdp"})
    source, method = rl_stage.prepare(cfg)
    from trainer.distributed import DistInfo

    dist = DistInfo(rank=0, world_size=2, local_rank=0, device=torch.device("cpu"), is_distributed=True)
    with pytest.raises(UserError, match="ddp"):
        rl_stage.build_trainer(cfg, method, source, dist)


def test_shipped_configs_validate() -> None:
    from utils.config import load_config

    for name in ("grpo", "gspo", "ppo", "rft"):
        cfg = load_config(REPO_ROOT / "configs" / "align" / f"{name}.yaml", RLConfig, [])
        assert cfg.rl.algorithm == name
