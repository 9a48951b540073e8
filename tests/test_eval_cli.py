"""eval/run_eval.py from the shell: outputs, the config form, --base_url against our own server, bad input.

A tiny random model with a tiny tokenizer (`serving_fixtures.make_checkpoint`), the shared data,
CPU only, a few samples per task.
"""
from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from conftest import assert_user_error, run_script
from serving_fixtures import make_checkpoint, serve_checkpoint

SCRIPT = "eval/run_eval.py"
ENV = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("eval_cli") / "ckpt", max_seq_len=1024)


def _eval(args: list[str], timeout: float = 240):
    return run_script([SCRIPT, *args], env=ENV, timeout=timeout)


def test_all_tasks_write_results_table_and_samples(ckpt, shared_data, tmp_path):
    out = tmp_path / "out"
    text = shared_data / "tinystories" / "tinystories_v1_valid_head.txt"  # not the repo's data/, whatever it holds
    proc = _eval(["--checkpoint", str(ckpt), "--tasks", "ppl,mmlu,gsm8k,humaneval", "--limit", "2", "--shots", "1",
                  "--batch_size", "4", "--out", str(out), "--set", "eval.max_gen_toks=16",
                  "--set", f"eval.ppl_data={text}"])
    assert proc.returncode == 0, proc.stderr
    data = json.loads((out / "results.json").read_text())
    assert data["model"]["backend"] == "local" and data["model"]["checkpoint"] == str(ckpt.resolve())
    assert data["settings"]["eval"]["limit"] == 2 and data["settings"]["eval"]["data_dir"] == str(shared_data)
    res = data["results"]
    assert set(res) == {"ppl", "mmlu", "gsm8k", "humaneval"}
    assert {"token_perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte"} <= set(res["ppl"]["metrics"])
    assert {"acc", "acc_macro", "acc_stem", "acc_humanities", "acc_social_sciences", "acc_other",
            "acc_subject/abstract_algebra"} <= set(res["mmlu"]["metrics"])
    assert set(res["gsm8k"]["metrics"]) == {"exact_match,strict-match", "exact_match,flexible-extract"}
    assert set(res["humaneval"]["metrics"]) == {"pass@1"}
    for task in res.values():
        for m in task["metrics"].values():
            assert set(m) == {"value", "stderr"}
        assert task["data_sha256"] and all(len(h) == 64 for h in task["data_sha256"].values())
    assert res["mmlu"]["n_samples"] == 2 * 57 and res["mmlu"]["task_settings"]["split"] == "val"
    assert res["gsm8k"]["task_settings"]["shots"] == 1 and res["gsm8k"]["n_samples"] == 2
    assert res["humaneval"]["task_settings"]["sandbox_network"] in ("netns", "socket-blocked")
    table = (out / "results.md").read_text()
    assert "| gsm8k | exact_match,flexible-extract | 2 |" in table and "## MMLU subjects" in table
    assert table in proc.stdout
    for task, n in (("mmlu", 114), ("gsm8k", 2), ("humaneval", 2), ("ppl", 2)):
        lines = (out / f"samples_{task}.jsonl").read_text().splitlines()
        assert len(lines) == n
        rec = json.loads(lines[0])
        assert "prompt" in rec
        if task != "ppl":
            assert {"output", "extracted", "target", "correct"} <= set(rec)
    gsm = json.loads((out / "samples_gsm8k.jsonl").read_text().splitlines()[0])
    assert gsm["prompt"].count("Question:") == 2 and gsm["prompt"].endswith("\nAnswer:")


def test_config_form_and_print_config(ckpt, shared_data, tmp_path):
    proc = _eval(["--config_path", "configs/eval/default.yaml", "--checkpoint", str(ckpt), "--print_config"])
    assert proc.returncode == 0, proc.stderr
    assert "stage: eval" in proc.stdout and str(ckpt.resolve()) in proc.stdout
    out = tmp_path / "cfg_out"
    proc = _eval(["--config_path", "configs/eval/default.yaml", "--set", f"model.checkpoint={ckpt}",
                  "--set", "eval.tasks=mmlu", "--set", "eval.limit=1", "--set", f"output.out={out}"])
    assert proc.returncode == 0, proc.stderr
    assert json.loads((out / "results.json").read_text())["results"]["mmlu"]["n_samples"] == 57


def test_base_url_against_our_server_equals_local(ckpt, shared_data, tmp_path):
    common = ["--tasks", "gsm8k", "--limit", "2", "--shots", "1", "--set", "eval.max_gen_toks=16"]
    with serve_checkpoint(ckpt, model_name="tiny-eval") as (_, server):
        proc = _eval(["--base_url", f"{server.url}/v1", "--model", "tiny-eval", "--out", str(tmp_path / "api"),
                      *common])
    assert proc.returncode == 0, proc.stderr
    proc_local = _eval(["--checkpoint", str(ckpt), "--out", str(tmp_path / "local"), *common])
    assert proc_local.returncode == 0, proc_local.stderr
    api = json.loads((tmp_path / "api" / "results.json").read_text())
    assert api["model"] == {"backend": "openai-api", "base_url": f"{server.url}/v1", "model": "tiny-eval"}
    read = lambda d: [json.loads(x) for x in (tmp_path / d / "samples_gsm8k.jsonl").read_text().splitlines()]  # noqa: E731
    api_samples, local_samples = read("api"), read("local")
    assert len(api_samples) == 2
    # the same engine, greedy, the same prompt: the same completions and scores
    assert [s["output"] for s in api_samples] == [s["output"] for s in local_samples]
    assert api["results"]["gsm8k"]["metrics"] == json.loads(
        (tmp_path / "local" / "results.json").read_text())["results"]["gsm8k"]["metrics"]


@pytest.mark.slow
def test_adapter_equals_the_merged_checkpoint(ckpt, shared_data, tmp_path):
    """--adapter (ours, or a PEFT adapter in transformers' names on the exported HF directory)
    scores exactly as the checkpoint with the adapter merged in, and not as the base."""
    import torch

    from model import build_model
    from model.config import ModelConfig
    from model.lora import LoraConfig, apply_lora, lora_parameters
    from model.lora_io import merged_state_dict, save_adapter
    from utils.checkpoint import load_checkpoint, save_checkpoint
    from utils.convert_hf import checkpoint_to_hf

    base = load_checkpoint(ckpt)
    model = build_model(ModelConfig(**base.model_config))
    model.load_state_dict(base.state_dict)
    apply_lora(model, LoraConfig(r=4, alpha=8))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.copy_(0.1 * torch.randn(p.shape, generator=g))
    save_adapter(model, tmp_path / "adapter", base_model_path=str(ckpt))
    save_adapter(model, tmp_path / "peft_adapter", hf_names=True)
    save_checkpoint(tmp_path / "merged", merged_state_dict(model), base.model_config, tokenizer_dir=ckpt)
    checkpoint_to_hf(ckpt, tmp_path / "hf")

    text = shared_data / "tinystories" / "tinystories_v1_valid_head.txt"
    runs = {"adapter": ["--checkpoint", str(ckpt), "--adapter", str(tmp_path / "adapter")],
            "merged": ["--checkpoint", str(tmp_path / "merged")],
            "hf+peft": ["--checkpoint", str(tmp_path / "hf"), "--adapter", str(tmp_path / "peft_adapter")],
            "base": ["--checkpoint", str(ckpt)]}
    lls, ppl = {}, {}
    for name, args in runs.items():
        out = tmp_path / f"out_{name}"
        proc = _eval([*args, "--tasks", "ppl,mmlu", "--limit", "1", "--shots", "1", "--out", str(out),
                      "--set", f"eval.ppl_data={text}"])
        assert proc.returncode == 0, proc.stderr
        results = json.loads((out / "results.json").read_text())
        ppl[name] = results["results"]["ppl"]["metrics"]["token_perplexity"]["value"]
        lls[name] = [x for line in (out / "samples_mmlu.jsonl").read_text().splitlines()
                     for x in json.loads(line)["loglikelihoods"]]
        if name in ("adapter", "hf+peft"):
            assert results["model"]["adapter"] == str(Path(args[3]).resolve())
    assert len(lls["merged"]) == 57 * 4
    for name in ("adapter", "hf+peft"):
        assert max(abs(a - b) for a, b in zip(lls[name], lls["merged"])) <= 1e-4, name
        assert ppl[name] == pytest.approx(ppl["merged"], rel=1e-5), name
    assert max(abs(a - b) for a, b in zip(lls["base"], lls["merged"])) > 1e-2  # the adapter matters


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("args,contains", [
    (["--tasks", "mmlx"], "did you mean mmlu"),
    (["--tasks", "gsm8k", "--limit", "0"], "--limit must be >= 1"),
    (["--tasks", "mmlu", "--shots", "6"], "--shots 6 is more than the 5 MMLU dev examples"),
    (["--tasks", "gsm8k", "--data_dir", "/nonexistent/data"], "data directory not found: /nonexistent/data"),
    (["--tasks", "mmlu", "--data_dir", "{tmp}"], "mmlu: no data at"),
])
def test_bad_input_exits_2_with_one_line(ckpt, shared_data, tmp_path, args, contains):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    line = assert_user_error(_eval(["--checkpoint", str(ckpt), *args]), contains)
    assert line.startswith("error: ")


def test_missing_checkpoint_and_dead_server_exit_2(tmp_path):
    assert_user_error(_eval(["--checkpoint", str(tmp_path / "nope"), "--tasks", "gsm8k"]), "checkpoint not found")
    url = f"http://127.0.0.1:{_free_port()}/v1"
    line = assert_user_error(_eval(["--base_url", url, "--model", "m", "--tasks", "gsm8k", "--limit", "1"]))
    assert url in line and "no OpenAI-compatible server answers" in line
    assert_user_error(_eval(["--base_url", url, "--tasks", "mmlu"]), "no OpenAI-compatible server answers")
    assert_user_error(_eval(["--tasks", "gsm8k"]), "give exactly one of checkpoint")
