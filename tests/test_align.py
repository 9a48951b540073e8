"""The offline alignment stages end to end on tiny models: every method and loss type trains,
the three references agree where they must, runs resume exactly (with the precomputed reference
log-probs), 2-process DDP equals 1 process, and user mistakes exit 2 with one line.

Data: the built-in preference pairs encoded with a small BPE; base: a tiny random model
(`tests/align_fixtures.py`). The losses themselves are checked by hand in test_align_losses.py
and against TRL in test_align_trl_parity.py.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from align import stage
from align.config import AlignConfig
from align.data import KTOLoader, balanced_batches, build_preference_loaders
from align.objectives import pair_logps
from align.reference import TABLE_FILE, ModelReference, reference_columns
from align_fixtures import AlignEnv, align_config, align_dict, make_align_env, metrics, train_losses, val_records
from conftest import assert_user_error, run_script
from data_pipeline.chat_loaders import PreferenceLoader
from finetune.base_model import BaseModelSource, build_sft_model
from model.lora import disable_adapters, lora_modules
from test_distributed import torchrun
from test_sft import one_thread  # noqa: F401 (autouse fixture)
from utils.checkpoint import REWARD_MODEL, load_checkpoint
from utils.config import validate
from utils.errors import UserError

TRL_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
               "logps/rejected")


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> AlignEnv:
    return make_align_env(tmp_path_factory.mktemp("align"))


def run_dir(runs: Path, name: str) -> Path:
    return runs / "align" / name


# ---------------------------------------------------------------------------- data
def test_kto_examples_and_mismatched_partners(env: AlignEnv) -> None:
    base = env.data_dir / "preference" / "train"
    pairs = PreferenceLoader(base, batch_size=3, shuffle=False)
    kto = KTOLoader(base, batch_size=3, shuffle=False)
    b = next(kto)
    n = len(pairs.bin)
    assert b["desirable"].tolist() == [1, 1, 1, 0, 0, 0]
    for k, i in enumerate(b["pair_ids"].tolist()):
        prompt, chosen, rejected = pairs.pair(i)
        partner = pairs.pair((i + 1) % n)
        for row, (key, reply) in enumerate((("input_ids", chosen), ("input_ids", rejected),
                                            ("kl_input_ids", partner[1]), ("kl_input_ids", partner[2]))):
            r = k + 3 * (row % 2)
            seq = torch.cat([torch.from_numpy(prompt), torch.from_numpy(reply)])
            assert b[key][r, :len(seq)].tolist() == seq.tolist()
        targets = (b["labels"][k] != -100).sum().item()
        assert targets == len(chosen)  # response tokens only


@pytest.mark.parametrize("world_size, batch_size", [(1, 8), (1, 3), (2, 3), (3, 2), (2, 1)])
def test_balanced_batches_cover_every_pair_in_equal_batch_counts(env: AlignEnv, world_size: int, batch_size: int) -> None:
    """No held-out pair is dropped to fill whole batches, none is counted twice, every rank
    runs the same number of forwards (FSDP2 gathers weights in each), batches ≤ batch_size."""
    base = env.data_dir / "preference" / "val"
    loader = PreferenceLoader(base, batch_size=batch_size, shuffle=False)
    n = len(loader.bin)
    assert n % (batch_size * world_size) != 0 or batch_size == 1  # a size whole batches would cut short
    per_rank = [[b["pair_ids"].tolist() for b in balanced_batches(loader, r, world_size, batch_size)]
                for r in range(world_size)]
    assert len({len(batches) for batches in per_rank}) == 1
    seen = sorted(i for batches in per_rank for b in batches for i in b)
    assert seen == list(range(n))
    if batch_size > 1:
        assert max(len(b) for batches in per_rank for b in batches) <= batch_size


# ---------------------------------------------------------------------------- training runs
def test_dpo_precompute_learns_and_logs_trl_metrics(env: AlignEnv, tmp_path: Path) -> None:
    cfg = align_config(env, tmp_path, "dpo", align={"method": "dpo", "beta": 0.5},
                       training={"max_steps": 16, "eval_interval": 8, "eval_steps": 4})
    summary = stage.train(cfg, reward=False)
    run = run_dir(tmp_path, "dpo")
    records = metrics(run)
    train = [r for r in records if "loss" in r]
    assert all(k in train[0] for k in TRL_METRICS)
    assert train[0]["rewards/margins"] == pytest.approx(0.0, abs=0.05)  # step 1: policy = reference
    vals = val_records(run)
    assert all(f"val_{k}" in vals[-1] for k in TRL_METRICS) and "val_ppl" not in vals[-1]
    assert vals[-1]["val_rewards/margins"] > 0.05  # the held-out implicit reward now prefers the chosen replies
    assert vals[-1]["val_rewards/accuracies"] > 0.6
    assert (run / TABLE_FILE).is_file()
    final = load_checkpoint(summary["final_checkpoint"])
    assert final.task != REWARD_MODEL and "lm_head.weight" in final.state_dict
    assert (run / "loss.png").is_file()


@pytest.mark.parametrize("section", [
    {"method": "dpo", "loss_type": "ipo"}, {"method": "dpo", "loss_type": "hinge"},
    {"method": "dpo", "loss_type": "robust", "label_smoothing": 0.1}, {"method": "dpo", "loss_type": "bco_pair"},
    {"method": "dpo", "rpo_alpha": 1.0, "reference": "frozen"}, {"method": "orpo"}, {"method": "simpo"},
    {"method": "kto", "desirable_weight": 1.5}, {"method": "kto", "reference": "frozen"},
], ids=lambda s: "-".join(str(v) for v in s.values()))
def test_every_method_trains(env: AlignEnv, tmp_path: Path, section: dict) -> None:
    cfg = align_config(env, tmp_path, "m", align=section, training={"max_steps": 6, "eval_interval": 6})
    stage.train(cfg, reward=False)
    records = metrics(run_dir(tmp_path, "m"))
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses)))
    assert all(k in records[0] for k in TRL_METRICS)
    assert "val_rewards/accuracies" in val_records(run_dir(tmp_path, "m"))[-1]
    uses_reference = section["method"] in ("dpo", "kto") and section.get("reference") != "frozen"
    assert (run_dir(tmp_path, "m") / TABLE_FILE).is_file() == uses_reference  # orpo / simpo need no reference
    saved = (run_dir(tmp_path, "m") / "config.yaml").read_text()
    assert f"method: {section['method']}" in saved and "beta:" in saved  # defaults filled in


def test_lora_dpo_adapters_off_and_qlora(env: AlignEnv, tmp_path: Path) -> None:
    cfg = align_config(env, tmp_path, "lora", align={"method": "dpo"}, lora={"r": 4, "alpha": 8.0},
                       training={"max_steps": 4, "eval_interval": 4, "learning_rate": 5e-3})
    summary = stage.train(cfg, reward=False)
    assert cfg.align.reference == "adapters_off"  # the default with adapters
    assert (summary["final_checkpoint"] / "adapter_model.safetensors").is_file()
    cfg = align_config(env, tmp_path, "qlora", align={"method": "kto"}, qlora={}, lora={"r": 4},
                       training={"max_steps": 3, "eval_interval": 3})
    stage.train(cfg, reward=False)
    assert len(train_losses(run_dir(tmp_path, "qlora"))) == 3


def test_references_agree(env: AlignEnv, tmp_path: Path) -> None:
    """adapters_off on a LoRA model (adapters made non-zero) == the frozen base == the stored
    precomputed table; and the policy with its adapters on differs."""
    cfg = align_config(env, tmp_path, "ref", align={"method": "dpo"}, lora={"r": 4})
    source, method = stage.prepare(cfg, reward=False)
    cpu = torch.device("cpu")
    policy = build_sft_model(source, cfg, method, cpu, torch.float32)
    for _, m in lora_modules(policy):
        for p in m.lora_B.parameters():
            torch.nn.init.normal_(p, std=0.05)
    frozen = build_sft_model(BaseModelSource.open(source.path), cfg, "full", cpu, torch.float32)
    train, _, _ = build_preference_loaders(cfg, 0, 1, None)
    batch = next(train)
    off = ModelReference(policy, kto=False, amp=lambda: torch.autocast("cpu", enabled=False), adapters_off=True)(batch)
    assert torch.allclose(off, reference_columns(frozen, batch, kto=False), atol=1e-5)
    with torch.no_grad():
        on = pair_logps(policy.eval(), batch)
    assert not torch.allclose(on.chosen, off[:, 0], atol=1e-3)
    with disable_adapters(policy), torch.no_grad():
        assert torch.allclose(pair_logps(policy, batch).chosen, off[:, 0], atol=1e-5)


def test_exact_resume_with_precomputed_reference(env: AlignEnv, tmp_path: Path) -> None:
    """Stopped at step 5 and resumed == straight through, bit for bit; the resumed run reads the
    stored reference log-probs instead of recomputing them."""
    sections = dict(align={"method": "dpo", "beta": 0.3}, training={"max_steps": 10, "eval_interval": 5},
                    checkpointing={"save_interval": 5})
    stage.train(align_config(env, tmp_path, "straight", **sections), reward=False)
    stage.train(align_config(env, tmp_path, "pieces", **sections), reward=False, stop_at=5)
    run = run_dir(tmp_path, "pieces")
    table = load_file(str(run / TABLE_FILE))
    mtime = (run / TABLE_FILE).stat().st_mtime_ns
    stage.train(align_config(env, tmp_path, "pieces", **sections), reward=False, resume="auto")
    assert (run / TABLE_FILE).stat().st_mtime_ns == mtime
    assert all(torch.equal(table[k], v) for k, v in load_file(str(run / TABLE_FILE)).items())
    assert train_losses(run) == train_losses(run_dir(tmp_path, "straight"))
    assert val_records(run)[-1]["val_loss"] == val_records(run_dir(tmp_path, "straight"))[-1]["val_loss"]


def test_reward_model_trains_and_is_marked(env: AlignEnv, tmp_path: Path) -> None:
    cfg = align_config(env, tmp_path, "rm", reward={"margin": 0.1, "center_rewards_coefficient": 0.01},
                       training={"max_steps": 16, "eval_interval": 8, "eval_steps": 4})
    summary = stage.train(cfg, reward=True)
    vals = val_records(run_dir(tmp_path, "rm"))
    assert {"val_accuracy", "val_margin"} <= set(vals[-1])
    assert vals[-1]["val_accuracy"] > 0.6
    final = load_checkpoint(summary["final_checkpoint"])
    assert final.task == REWARD_MODEL
    assert "score.weight" in final.state_dict and "lm_head.weight" not in final.state_dict
    # LoRA: the final is still a full reward model (adapters merged, score head trained)
    cfg = align_config(env, tmp_path, "rm_lora", reward={}, lora={"r": 4}, training={"max_steps": 3})
    summary = stage.train(cfg, reward=True)
    final = load_checkpoint(summary["final_checkpoint"])
    assert final.task == REWARD_MODEL and not any("lora" in k for k in final.state_dict)


# ---------------------------------------------------------------------------- distributed
@pytest.mark.slow
def test_two_process_ddp_equals_one_process(env: AlignEnv, tmp_path: Path) -> None:
    """DPO (precompute, shared across ranks) and KTO (z0 all-reduced): 2 ranks × 2 pairs == 1 × 4."""
    for method in ("dpo", "kto"):
        common = align_dict(env, tmp_path, "x", align={"method": method}, training={"max_steps": 4, "eval_interval": 4})
        config = tmp_path / f"{method}.json"
        config.write_text(json.dumps(common))
        script = Path(stage.__file__).parent / "train_offline.py"
        one = ["--set", f"logging.run_name={method}1", "--set", "training.batch_size=4"]
        two = ["--set", f"logging.run_name={method}2", "--set", "training.batch_size=2"]
        proc = run_script([str(script), "--config_path", str(config), *one])
        assert proc.returncode == 0, proc.stderr[-3000:]
        torchrun(script, ["--config_path", str(config), *two])
        a, b = train_losses(run_dir(tmp_path, f"{method}1")), train_losses(run_dir(tmp_path, f"{method}2"))
        # float-level: DDP averages the gradients in another order, and Adam steps near-zero entries by ~lr
        assert len(a) == 4 and a == pytest.approx(b, rel=1e-4)
        va, vb = val_records(run_dir(tmp_path, f"{method}1")), val_records(run_dir(tmp_path, f"{method}2"))
        same_pairs_other_batching = pytest.approx([r["val_loss"] for r in vb], rel=1e-4)
        assert va and [r["val_loss"] for r in va] == same_pairs_other_batching


# ---------------------------------------------------------------------------- user mistakes
def write_config(env: AlignEnv, tmp_path: Path, **sections) -> Path:
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(align_dict(env, tmp_path, "bad", **sections)))
    return path


@pytest.mark.parametrize("section, contains", [
    ({"method": "dpo", "gamma": 1.0}, "align.gamma belongs to method simpo"),
    ({"method": "orpo", "reference": "frozen"}, "align.reference belongs to method dpo / kto"),
    ({"method": "dpo", "beta": 0}, "align.beta"),
    ({"method": "dpo", "beta": -1}, "align.beta"),
    ({"method": "kto", "desirable_weight": -1}, "align.desirable_weight"),
    ({"method": "dpo", "loss_type": "sigmod"}, "align.loss_type"),
])
def test_bad_align_keys(env: AlignEnv, tmp_path: Path, section: dict, contains: str) -> None:
    with pytest.raises(UserError, match=contains.replace(".", r"\.").replace("/", "/")):
        validate(align_dict(env, tmp_path, "x", align=section), AlignConfig)


def test_cli_user_errors(env: AlignEnv, tmp_path: Path) -> None:
    offline = "align/train_offline.py"
    cfg = write_config(env, tmp_path, align={"method": "dpo"})
    # preference bins missing
    proc = run_script([offline, "--config_path", str(cfg), "--set", f"data.data_dir={tmp_path / 'nodata'}",
                       "--set", f"data.tokenizer_dir={env.data_dir / 'tokenizer'}"])
    assert_user_error(proc, "preference bins not found")
    # a method-specific key of another method, beta <= 0
    assert_user_error(run_script([offline, "--config_path", str(cfg), "--set", "align.gamma=0.5"]), "align.gamma")
    assert_user_error(run_script([offline, "--config_path", str(cfg), "--set", "align.beta=0"]), "align.beta")
    assert_user_error(run_script([offline, "--config_path", str(cfg), "--set", "align.method=kto", "--set",
                                  "align.undesirable_weight=-2"]), "align.undesirable_weight")
    # adapters_off without adapters
    assert_user_error(run_script([offline, "--config_path", str(cfg), "--set", "align.reference=adapters_off"]),
                      "adapters_off")


def test_cli_wrong_checkpoint_kinds_and_tokenizer(env: AlignEnv, tmp_path: Path) -> None:
    offline = "align/train_offline.py"
    rm = align_config(env, tmp_path, "rm_for_cli", reward={}, training={"max_steps": 1})
    rm_final = stage.train(rm, reward=True)["final_checkpoint"]
    cfg = write_config(env, tmp_path, align={"method": "dpo"})
    proc = run_script([offline, "--config_path", str(cfg), "--set", f"checkpointing.init_from={rm_final}"])
    assert_user_error(proc, "is a reward model")
    # bins built with another tokenizer than data.tokenizer_dir
    other = make_align_env(tmp_path / "other", num_pairs=60)
    tok = json.loads((other.data_dir / "tokenizer" / "tokenizer.json").read_text())
    tok["added_tokens"][0]["content"] = "<|changed|>"
    (other.data_dir / "tokenizer" / "tokenizer.json").write_text(json.dumps(tok))
    proc = run_script([offline, "--config_path", str(cfg), "--set", f"data.tokenizer_dir={other.data_dir / 'tokenizer'}"])
    line = assert_user_error(proc)
    assert "tokenizer" in line


def test_print_config_resolves_defaults(env: AlignEnv, tmp_path: Path) -> None:
    cfg = write_config(env, tmp_path, align={"method": "simpo"})
    proc = run_script(["align/train_offline.py", "--config_path", str(cfg), "--print_config"])
    assert proc.returncode == 0, proc.stderr
    assert "gamma: 1.0" in proc.stdout and "beta: 2.0" in proc.stdout and "method: simpo" in proc.stdout


def test_shipped_configs_validate() -> None:
    from utils.config import load_config
    root = Path(__file__).resolve().parent.parent / "configs" / "align"
    names = sorted(p.name for p in root.glob("*.yaml"))
    assert {"dpo.yaml", "orpo.yaml", "simpo.yaml", "kto.yaml", "reward_model.yaml", "dpo_lora.yaml"} <= set(names)
    for name in names:
        if "stage: rl" in (root / name).read_text():  # online RL: tests/test_rl.py
            continue
        cfg = load_config(root / name, AlignConfig)
        assert (cfg.align is None) != (cfg.reward is None), name
    assert sys.executable  # configs load without torch-side checks
