"""Pipeline parallelism: stage splits and config errors in one process, and real gloo runs on 2
ranks whose loss, gradients, training run and checkpoints equal one process's."""
from __future__ import annotations

import json

import pytest
import torch
import yaml

from model import build_model, get_preset
from test_context_parallel import _assert_same_records, _records
from test_distributed import torchrun
from trainer.pipeline import StageModel, rank_stages, split_optimizer_state
from trainer_fixtures import make_pretrain_data, tiny_config_dict
from utils.config import ExperimentConfig, TrainingConfig, load_config, stage_layer_counts, validate
from utils.errors import UserError
from utils.paths import REPO_ROOT

SCRIPTS = REPO_ROOT / "tests" / "dist_scripts"


def test_stage_layer_counts_and_rank_stages():
    assert stage_layer_counts(4, TrainingConfig(pipeline_parallel=2, grad_accum_steps=2)) == [2, 2]
    split = TrainingConfig(pipeline_parallel=2, grad_accum_steps=2, pipeline_split=[2, 1])
    assert stage_layer_counts(3, split) == [2, 1]
    interleaved = TrainingConfig(pipeline_parallel=2, grad_accum_steps=2, pipeline_schedule="interleaved_1f1b")
    assert stage_layer_counts(8, interleaved) == [2, 2, 2, 2]
    assert rank_stages(interleaved, 0) == [0, 2] and rank_stages(interleaved, 1) == [1, 3]


def test_bad_splits_are_one_line():
    with pytest.raises(UserError, match="model.n_layers=3 is not divisible into 2 pipeline stages"):
        load_config(None, ExperimentConfig, ["training.pipeline_parallel=2", "training.grad_accum_steps=2",
                                             "model.n_layers=3"])
    with pytest.raises(UserError, match=r"pipeline_split=\[2, 2\] must give 2 stages summing to model.n_layers=3"):
        load_config(None, ExperimentConfig, ["training.pipeline_parallel=2", "training.grad_accum_steps=2",
                                             "model.n_layers=3", "training.pipeline_split=[2,2]"])
    with pytest.raises(UserError, match="needs grad_accum_steps"):
        load_config(None, ExperimentConfig, ["training.pipeline_parallel=4", "model.n_layers=4"])
    with pytest.raises(UserError, match="eval_steps=3 must be a multiple of grad_accum_steps=2"):
        load_config(None, ExperimentConfig, ["training.pipeline_parallel=2", "training.grad_accum_steps=2",
                                             "training.eval_steps=3"])
    with pytest.raises(UserError, match="a multiple of pipeline_parallel=2, got 5"):
        load_config(None, ExperimentConfig, ["training.pipeline_parallel=2", "training.grad_accum_steps=5",
                                             "training.pipeline_schedule=interleaved_1f1b", "model.n_layers=4"])


def test_stage_model_keeps_the_whole_models_names_and_computes_its_part():
    torch.manual_seed(0)
    model = build_model(get_preset("tiny-llama3", n_layers=4))
    first, last = StageModel(model, [0, 1], True, False), StageModel(model, [2, 3], False, True)
    assert set(first.state_dict()) | set(last.state_dict()) == set(model.state_dict())
    assert "layers.2.attn.q_proj.weight" in last.state_dict()
    tokens = torch.randint(0, 256, (2, 8))
    positions = torch.arange(8).expand(2, 8)
    with torch.no_grad():
        torch.testing.assert_close(last(first(tokens, positions), positions), model(tokens), rtol=0, atol=0)
    full = {"state": {"layers.2.x": {"step": 1}, "embed.weight": {"step": 1}},
            "param_groups": [{"lr": 1, "params": ["embed.weight", "layers.2.x"]}, {"lr": 2, "params": ["norm.w"]}]}
    part = split_optimizer_state(full, {"layers.2.x", "norm.w"})
    assert part["state"] == {"layers.2.x": {"step": 1}}
    assert part["param_groups"] == [{"lr": 1, "params": ["layers.2.x"]}, {"lr": 2, "params": ["norm.w"]}]


@pytest.mark.slow
def test_pipeline_loss_and_every_gradient_equal_one_process(tmp_path):
    """Tiny Llama (GPipe, 1F1B, interleaved 1F1B) and DeepSeek-V3 (MLA + MoE, split [2, 1];
    GPipe, 1F1B) on 2 stages: the loss and every parameter's gradient, and the merged weights
    after an update, == one process (4 micro-batches with masked targets)."""
    out = tmp_path / "out.json"
    torchrun(SCRIPTS / "pipeline_tiny.py", [str(out)], nproc=2)
    got = json.loads(out.read_text())
    assert set(got) == {"tiny-llama3/gpipe", "tiny-llama3/1f1b", "tiny-llama3/interleaved_1f1b",
                        "tiny-deepseek_v3/gpipe", "tiny-deepseek_v3/1f1b"}
    for name, r in got.items():
        assert r["loss"] <= 1e-5 and r["grads"] <= 1e-5 and r["weights_after_step"] <= 1e-5, (name, r)
        assert r["missing_grads"] == 0 and r["keys_merged"], (name, r)
        assert sum(r["params_per_rank"]) == r["params_total"] and min(r["params_per_rank"]) > 0, (name, r)


@pytest.mark.slow
def test_pretrain_pipelined_resumes_and_matches_one_process(tmp_path):
    """`pretrain/train.py` on 4 ranks: 2 data-parallel replicas x 2 pipeline stages (1F1B, 2
    micro-batches), validated at step 2, stopped after 3 of 4 steps and resumed from its
    per-stage-merged checkpoint == one process straight through (losses, gradient norms,
    validation losses); the final checkpoint loads into a plain model."""
    import pretrain.train as pretrain
    from utils.checkpoint import load_checkpoint

    data_dir = make_pretrain_data(tmp_path)
    runs = tmp_path / "runs"
    training = {"max_steps": 4, "eval_interval": 2, "batch_size": 2, "grad_accum_steps": 2, "optimizer": "muon"}
    common = dict(checkpointing={"save_interval": 100})
    parallel = {"pipeline_parallel": 2, "batch_size": 1}
    four = tiny_config_dict(data_dir, runs, run_name="pp", training={**training, **parallel},
                            **common)
    config = tmp_path / "pp.yaml"
    config.write_text(yaml.safe_dump(four))
    torchrun(SCRIPTS / "pretrain_until.py", [str(config), "3"], nproc=4)
    torchrun(REPO_ROOT / "pretrain" / "train.py", ["--config_path", str(config), "--resume", "auto"], nproc=4)
    one = tiny_config_dict(data_dir, runs, run_name="one", training=training, **common)
    pretrain.train(validate(one, ExperimentConfig))
    _assert_same_records(_records(runs / "pretrain" / "pp"), _records(runs / "pretrain" / "one"))
    wa = load_checkpoint(runs / "pretrain/pp/checkpoints/final").state_dict
    wb = load_checkpoint(runs / "pretrain/one/checkpoints/final").state_dict
    assert wa.keys() == wb.keys()
    for k in wb:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-5, msg=k)


def test_lora_sft_refuses_pipeline_parallel(tmp_path):
    from finetune import sft
    from finetune.config import SFTConfig
    from trainer.distributed import DistInfo

    cfg = load_config(None, SFTConfig, ["training.pipeline_parallel=2", "training.grad_accum_steps=2",
                                        f"checkpointing.init_from={tmp_path}"])
    single = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), is_distributed=False)
    with pytest.raises(UserError, match="pipeline_parallel is not supported with LoRA/QLoRA"):
        sft.check_inputs(cfg, "lora", None, single)
