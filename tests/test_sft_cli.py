"""The three SFT scripts as a user runs them: configs/sft/*.yaml, user errors (exit 2, one line),
--print_config with the model resolved from the base, and short real runs of each script.

Error paths run the scripts' `main` in this process through `utils.errors.cli_main` (a
subprocess costs seconds of imports); each script also runs once for real as a subprocess."""
from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest
import yaml

from conftest import run_script
from finetune import sft
from test_sft import SFTEnv, make_sft_env, one_thread  # noqa: F401 (autouse fixture)
from utils.checkpoint import load_checkpoint
from utils.errors import cli_main

FULL = "finetune/sft_train.py"
LORA = "finetune/peft/lora/sft_lora_train.py"
QLORA = "finetune/peft/qlora/sft_qlora_train.py"
SCRIPTS = {"full": FULL, "lora": LORA, "qlora": QLORA}


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> SFTEnv:
    return make_sft_env(tmp_path_factory.mktemp("sft_cli"))


def overrides(env: SFTEnv, runs: Path, steps: int = 3) -> list[str]:
    """The shipped configs pointed at the test data, base and a temporary runs dir, made tiny."""
    items = [f"data.data_dir={env.data_dir}", f"checkpointing.init_from={env.base}", f"logging.runs_dir={runs}",
             f"training.max_steps={steps}", "training.batch_size=2", "training.eval_steps=1",
             "training.eval_interval=100", "checkpointing.save_interval=100", "logging.log_interval=1"]
    return [arg for item in items for arg in ("--set", item)]


def run_main(monkeypatch, capsys, method: str, args: list[str]) -> tuple[int, str, str]:
    """A script's `main` in this process, as `cli_main` runs it: (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", [SCRIPTS[method], *args])
    with pytest.raises(SystemExit) as exit_info:
        cli_main(lambda: sft.main(method, "test"))
        raise SystemExit(0)
    out = capsys.readouterr()
    return exit_info.value.code, out.out, out.err


def one_error_line(code: int, err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_unknown_key_exits_2_with_one_line(monkeypatch, capsys) -> None:
    code, _, err = run_main(monkeypatch, capsys, "lora", ["--config_path", "configs/sft/lora.yaml",
                                                          "--set", "lora.alpah=8"])
    line = one_error_line(code, err)
    assert "lora.alpah" in line and "`alpha`" in line


def test_missing_base_and_wrong_script(env: SFTEnv, tmp_path: Path, monkeypatch, capsys) -> None:
    code, _, err = run_main(monkeypatch, capsys, "full", [
        "--config_path", "configs/sft/full.yaml", *overrides(env, tmp_path),
        "--set", f"checkpointing.init_from={tmp_path / 'nothing'}"])
    line = one_error_line(code, err)
    assert "checkpointing.init_from" in line and "no such directory" in line
    code, _, err = run_main(monkeypatch, capsys, "full", ["--config_path", "configs/sft/lora.yaml",
                                                          *overrides(env, tmp_path)])
    assert "sft_lora_train.py" in one_error_line(code, err)
    assert not (tmp_path / "sft").exists()


def test_print_config_shows_the_resolved_model(env: SFTEnv, tmp_path: Path, monkeypatch, capsys) -> None:
    code, out, err = run_main(monkeypatch, capsys, "qlora", ["--config_path", "configs/sft/qlora.yaml",
                                                             *overrides(env, tmp_path), "--print_config"])
    assert code == 0, err
    cfg = yaml.safe_load(out)
    assert cfg["stage"] == "sft" and cfg["model"]["dim"] == 64 and cfg["model"]["vocab_size"] == 1024  # from the base
    assert cfg["model"]["max_seq_len"] == 512  # the config's override
    assert cfg["model"]["rope_scaling"]["original_max_position_embeddings"] == 256  # the base's length
    assert cfg["lora"]["r"] == 16 and cfg["qlora"]["blocksize"] == 64
    assert not (tmp_path / "sft").exists()


def check_final(run: Path, method: str, merged: bool) -> None:
    final = run / "checkpoints" / "final"
    assert (final / "tokenizer.json").is_file()
    assert "chat_template" in json.loads((final / "tokenizer_config.json").read_text())
    if method == "full" or merged:  # a plain checkpoint inference loads by itself
        assert load_checkpoint(final).model_config["rope_scaling"]["type"] == "linear"
    else:
        assert not (final / "model.safetensors").exists()
    if method != "full":
        assert (final / "adapter_model.safetensors").is_file() and (final / "adapter_config.json").is_file()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert sum("loss" in r for r in records) == 3 and any("sample" in r for r in records)


@pytest.mark.parametrize("method, extra", [("full", []), ("lora", []), ("qlora", ["--set", "qlora.backend=torch"])])
def test_each_script_trains_and_writes_a_chat_ready_final(env: SFTEnv, tmp_path: Path, monkeypatch, capsys,
                                                          method: str, extra: list[str]) -> None:
    runpy.run_path(SCRIPTS[method])  # the script file imports its stage (run_name is not __main__)
    config = f"configs/sft/{method}.yaml"
    code, _, err = run_main(monkeypatch, capsys, method, ["--config_path", config, "--device", "cpu",
                                                          *overrides(env, tmp_path), *extra])
    assert code == 0, err[-3000:]
    check_final(tmp_path / "sft" / method, method, merged=False)


@pytest.mark.slow
def test_lora_script_as_a_user_runs_it(env: SFTEnv, tmp_path: Path) -> None:
    proc = run_script([LORA, "--config_path", "configs/sft/lora.yaml", "--device", "cpu", *overrides(env, tmp_path),
                       "--merge_and_save"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    check_final(tmp_path / "sft" / "lora", "lora", merged=True)
