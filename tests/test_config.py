"""The config system: strict YAML → typed objects, CLI overrides, one-line user errors."""
from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from conftest import assert_user_error, run_script
from utils.config import ExperimentConfig, apply_overrides, load_config, parse_override
from utils.errors import UserError
from utils.paths import REPO_ROOT

# A tiny CLI that loads a config exactly as every stage script does.
CLI = textwrap.dedent(
    """
    import argparse
    from utils.config import add_config_args, config_from_args
    from utils.errors import cli_main

    def main():
        ap = argparse.ArgumentParser()
        add_config_args(ap)
        cfg = config_from_args(ap.parse_args())
        print("OK", cfg.training.learning_rate, cfg.model.n_layers, cfg.data.data_dir, cfg.logging.run_name)

    cli_main(main)
    """
)

GOOD = textwrap.dedent(
    """
    model:
      dim: 64
      n_layers: 2
      n_heads: 4
      n_kv_heads: 2
      ffn_hidden_dim: 128
    data:
      data_dir: data/somewhere
    training:
      learning_rate: 3.0e-4
      max_steps: 10
    logging:
      run_name: test-{timestamp}
    """
)


@pytest.fixture()
def cli(tmp_path: Path) -> Path:
    p = tmp_path / "cli.py"
    p.write_text(CLI)
    return p


def write(tmp_path: Path, text: str, name: str = "c.yaml") -> Path:
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


BAD_YAML_CASES = {
    "unknown_top_key": ("trainng:\n  max_steps: 3\n", "did you mean `training`"),
    "unknown_nested_key": ("training:\n  learnig_rate: 0.1\n", "did you mean `learning_rate`"),
    "unknown_deep_key": ("model:\n  moe:\n    n_routed_expert: 4\n", "did you mean `n_routed_experts`"),
    "unknown_key_no_suggestion": ("training:\n  zzzz: 1\n", "unknown key `training.zzzz`"),
    "wrong_type_int": ("training:\n  batch_size: eight\n", "training.batch_size"),
    "wrong_type_float": ("training:\n  learning_rate: fast\n", "training.learning_rate"),
    "wrong_type_bool": ("training:\n  compile: maybe\n", "training.compile"),
    "fractional_int": ("model:\n  n_layers: 2.5\n", "model.n_layers"),
    "bad_enum": ("training:\n  optimizer: sgd\n", "'adamw' or 'muon'"),
    "bad_enum_model": ("model:\n  attention_type: flash\n", "model.attention_type"),
    "negative_required_positive": ("training:\n  batch_size: -4\n", "greater than 0"),
    "zero_required_positive": ("model:\n  dim: 0\n", "model.dim"),
    "out_of_range": ("training:\n  min_lr_ratio: 1.5\n", "training.min_lr_ratio"),
    "section_not_mapping": ("training: 5\n", "training"),
    "root_not_mapping": ("- a\n- b\n", "must be a mapping"),
    "impossible_heads": ("model:\n  n_heads: 8\n  n_kv_heads: 3\n", "divisible"),
    "impossible_mla_alibi": ("model:\n  attention_type: mla\n  position_type: alibi\n", "mla"),
    "impossible_mamba2_alibi": ("model:\n  family: mamba2\n  position_type: alibi\n", "do not support position_type=alibi"),
    "impossible_mamba2_sliding": ("model:\n  n_layers: 2\n  layer_types: [mamba, attention]\n  sliding_window: 64\n",
                                  "do not support sliding_window"),
    "impossible_moe_topk": ("model:\n  moe:\n    n_routed_experts: 2\n    num_experts_per_tok: 3\n", "num_experts_per_tok"),
    "missing_required_key": ("model:\n  rope_scaling:\n    factor: 2.0\n", "missing required key `model.rope_scaling.type`"),
    "malformed_yaml": ("training:\n  max_steps: [1, 2\n", "malformed YAML"),
    "bad_run_name": ("logging:\n  run_name: a/b\n", "run_name"),
}


@pytest.mark.parametrize("case", sorted(BAD_YAML_CASES))
def test_bad_config_exits_2_with_one_line(tmp_path: Path, cli: Path, case: str) -> None:
    text, expected = BAD_YAML_CASES[case]
    cfg = write(tmp_path, text)
    proc = run_script([str(cli), "--config_path", str(cfg)])
    assert_user_error(proc, expected)


BAD_CLI_CASES = {
    "missing_file": (["--config_path", "does/not/exist.yaml"], "config file not found"),
    "config_is_dir": (["--config_path", "."], "directory"),
    "set_without_equals": (["--set", "training.learning_rate"], "expected key.path=value"),
    "set_empty_key": (["--set", "=3"], "empty key"),
    "set_empty_segment": (["--set", "training..lr=3"], "empty key"),
    "set_unknown_key": (["--set", "training.lr=3e-4"], "unknown key `training.lr`"),
    "set_unknown_section": (["--set", "optim.lr=3"], "unknown key `optim`"),
    "set_wrong_type": (["--set", "training.max_steps=abc"], "training.max_steps"),
    "set_into_value": (["--set", "training.max_steps.x=1"], "is a value"),
    "set_bad_yaml": (["--set", "training.max_steps=[1,"], "not valid YAML"),
}


@pytest.mark.parametrize("case", sorted(BAD_CLI_CASES))
def test_bad_cli_exits_2_with_one_line(tmp_path: Path, cli: Path, case: str) -> None:
    args, expected = BAD_CLI_CASES[case]
    good = write(tmp_path, GOOD)
    if "--config_path" not in args:
        args = ["--config_path", str(good), *args]
    proc = run_script([str(cli), *args], cwd=tmp_path)
    assert_user_error(proc, expected)


def test_good_config_and_typed_overrides(tmp_path: Path, cli: Path) -> None:
    cfg = write(tmp_path, GOOD)
    proc = run_script([str(cli), "--config_path", str(cfg), "--set", "training.learning_rate=1e-3", "--set", "model.n_layers=4"])
    assert proc.returncode == 0, proc.stderr
    ok, lr, n_layers, data_dir, run_name = proc.stdout.split()
    assert ok == "OK" and float(lr) == 1e-3 and int(n_layers) == 4
    assert Path(data_dir) == REPO_ROOT / "data" / "somewhere"
    assert run_name.startswith("test-") and "{timestamp}" not in run_name


def test_override_types_follow_yaml() -> None:
    assert parse_override("training.learning_rate=3e-4") == (["training", "learning_rate"], "3e-4")
    assert parse_override("training.learning_rate=3.0e-4")[1] == 3.0e-4
    assert parse_override("training.compile=true")[1] is True
    assert parse_override("model.n_layers=4")[1] == 4
    assert parse_override("model.layer_types=[full, sliding]")[1] == ["full", "sliding"]
    assert parse_override("model.rope_scaling=null")[1] is None
    # "3e-4" is a YAML string; the typed field still accepts it as a float
    cfg = load_config(None, overrides=["training.learning_rate=3e-4", "model.n_layers=3"])
    assert cfg.training.learning_rate == pytest.approx(3e-4) and cfg.model.n_layers == 3


def test_overrides_create_nested_sections() -> None:
    data = apply_overrides({}, ["model.moe.n_routed_experts=4", "model.moe.num_experts_per_tok=2"])
    assert data == {"model": {"moe": {"n_routed_experts": 4, "num_experts_per_tok": 2}}}
    cfg = load_config(None, overrides=["model.moe.n_routed_experts=4"])
    assert cfg.model.moe is not None and cfg.model.moe.n_routed_experts == 4


def test_print_config_shows_resolved_values(tmp_path: Path, cli: Path) -> None:
    cfg = write(tmp_path, GOOD)
    proc = run_script([str(cli), "--config_path", str(cfg), "--set", "training.max_steps=77", "--print_config"])
    assert proc.returncode == 0, proc.stderr
    assert "OK" not in proc.stdout  # exits before running
    import yaml

    shown = yaml.safe_load(proc.stdout)
    assert shown["training"]["max_steps"] == 77
    assert shown["model"]["n_kv_heads"] == 2
    assert shown["data"]["data_dir"] == str(REPO_ROOT / "data" / "somewhere")
    # the printed config is itself a valid config
    again = tmp_path / "again.yaml"
    again.write_text(proc.stdout)
    assert load_config(again).training.max_steps == 77


def test_paths_resolve_against_repo_root_from_another_cwd(tmp_path: Path, cli: Path) -> None:
    cfg = write(tmp_path, GOOD)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = run_script([str(cli), "--config_path", str(cfg)], cwd=elsewhere)
    assert proc.returncode == 0, proc.stderr
    assert Path(proc.stdout.split()[3]) == REPO_ROOT / "data" / "somewhere"


def test_config_path_relative_to_cwd_then_repo_root(tmp_path: Path, cli: Path) -> None:
    write(tmp_path, GOOD, "local.yaml")
    proc = run_script([str(cli), "--config_path", "local.yaml"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr


def test_absolute_paths_stay() -> None:
    cfg = load_config(None, overrides=["data.data_dir=/abs/where"])
    assert cfg.data.data_dir == Path("/abs/where")


def test_defaults_are_valid_and_timestamp_filled() -> None:
    cfg = ExperimentConfig()
    assert "{timestamp}" not in cfg.logging.run_name
    assert cfg.data.data_dir == REPO_ROOT / "data"


def test_user_error_in_process() -> None:
    with pytest.raises(UserError, match="did you mean `max_steps`"):
        load_config(None, overrides=["training.max_step=3"])
