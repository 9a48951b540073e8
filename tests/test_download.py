"""Download steps: hub (faked), quick and loud fallback when the hub is unreachable, local files, errors."""
from __future__ import annotations

import json
import re
import socket
import sys
import time
import types

import pytest

from conftest import assert_user_error, run_script
from data_pipeline.builtin import generate_stories
from data_pipeline.cleaning.documents import read_documents
from data_pipeline.download import download_prompts as dp
from data_pipeline.download import download_tinystories as dt
from data_pipeline.download import sources
from data_pipeline.formats import EOS_TOKEN
from utils.errors import cli_main

BUILTIN_TASKS = {"addition", "subtraction", "multiplication", "division", "counting", "story_name", "story_color"}


def run_main(main, argv, capsys) -> tuple[int, str, str]:
    """Run a script's main in-process like its `cli_main` entry point: (exit code, stdout, stderr)."""
    try:
        cli_main(lambda: main(argv))
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def user_error(main, argv, capsys) -> str:
    code, _, err = run_main(main, argv, capsys)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.fixture
def closed_port_env(monkeypatch) -> dict:
    """An HF_ENDPOINT on this machine where nothing listens: connecting fails at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    return {"HF_ENDPOINT": f"http://127.0.0.1:{port}"}


@pytest.fixture
def fake_hub(monkeypatch):
    """A reachable hub: the probe passes and `datasets.load_dataset` streams the given rows."""
    calls = []

    def install(rows=None, error=None):
        def load_dataset(name, config=None, split=None, streaming=False):
            calls.append((name, config, split, streaming))
            if error is not None:
                raise error
            return iter(rows)
        monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
        monkeypatch.setattr(dt, "probe_hub", lambda repo, timeout: None)
        monkeypatch.setattr(dp, "probe_hub", lambda repo, timeout: None)
        return calls

    return install


def sidecar(path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


# ----------------------------------------------------------------------------- tinystories
def test_builtin_source(tmp_path, capsys):
    code, out, _ = run_main(dt.main, ["--source", "builtin", "--max_stories", "40", "--data_dir", str(tmp_path)], capsys)
    assert code == 0 and len(out.strip().splitlines()) == 1 and "40 stories" in out
    assert read_documents(tmp_path / "raw" / "tinystories.txt") == generate_stories(40, 0)
    meta = sidecar(tmp_path / "raw" / "tinystories.json")
    assert meta["source"] == meta["requested_source"] == "builtin" and meta["fallback_reason"] is None
    assert meta["num_stories"] == 40 and meta["bytes"] == (tmp_path / "raw" / "tinystories.txt").stat().st_size
    run_main(dt.main, ["--source", "builtin", "--max_stories", "40", "--split", "validation",
                       "--data_dir", str(tmp_path / "val")], capsys)
    val = read_documents(tmp_path / "val" / "raw" / "tinystories.txt")
    assert len(val) == 40 and not set(val) & set(generate_stories(40, 0))


def test_hub_unreachable_falls_back_quickly_and_loudly(tmp_path, closed_port_env):
    t0 = time.perf_counter()
    proc = run_script(["data_pipeline/download/download_tinystories.py", "--max_stories", "30",
                       "--data_dir", str(tmp_path)], env=closed_port_env)
    elapsed = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stderr
    assert elapsed < 15, f"fallback took {elapsed:.1f} s"
    warning = [ln for ln in proc.stderr.splitlines() if ln.startswith("WARNING")]
    assert len(warning) == 1 and "FALLING BACK" in warning[0] and "127.0.0.1" in warning[0]
    meta = sidecar(tmp_path / "raw" / "tinystories.json")
    assert (meta["source"], meta["requested_source"], meta["num_stories"]) == ("builtin", "hub", 30)
    assert "127.0.0.1" in meta["fallback_reason"]


def test_no_fallback_exits_2(tmp_path, closed_port_env):
    proc = run_script(["data_pipeline/download/download_tinystories.py", "--no_fallback",
                       "--data_dir", str(tmp_path)], env=closed_port_env)
    assert "--no_fallback" in assert_user_error(proc)
    assert not (tmp_path / "raw").exists()


def test_offline_variable_skips_the_network(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, _, err = run_main(dt.main, ["--max_stories", "5", "--data_dir", str(tmp_path)], capsys)
    assert code == 0 and "WARNING" in err and "HF_HUB_OFFLINE is set" in err


def test_hub_source_streams_rows(tmp_path, capsys, fake_hub):
    calls = fake_hub(rows=[{"text": f"Story number {i}.\nThe end."} for i in range(10)])
    code, _, err = run_main(dt.main, ["--max_stories", "4", "--split", "validation", "--data_dir", str(tmp_path)], capsys)
    assert code == 0 and "WARNING" not in err
    assert calls == [("roneneldan/TinyStories", None, "validation", True)]
    assert read_documents(tmp_path / "raw" / "tinystories.txt") == [f"Story number {i}.\nThe end." for i in range(4)]
    meta = sidecar(tmp_path / "raw" / "tinystories.json")
    assert (meta["source"], meta["dataset"], meta["split"]) == ("hub", "roneneldan/TinyStories", "validation")


def test_hub_error_while_loading_falls_back(tmp_path, capsys, fake_hub):
    fake_hub(error=ConnectionError("Couldn't reach the hub"))
    code, _, err = run_main(dt.main, ["--max_stories", "3", "--data_dir", str(tmp_path)], capsys)
    assert code == 0 and "ConnectionError: Couldn't reach the hub" in err and "FALLING BACK" in err
    assert sidecar(tmp_path / "raw" / "tinystories.json")["source"] == "builtin"


def test_local_shared_sample(tmp_path, capsys, shared_data):
    sample = shared_data / "tinystories" / "cs336_tinystories_sample.txt"
    code, _, _ = run_main(dt.main, ["--source", "local", "--input", str(sample), "--data_dir", str(tmp_path)], capsys)
    assert code == 0 and read_documents(tmp_path / "raw" / "tinystories.txt") == read_documents(sample)
    assert sidecar(tmp_path / "raw" / "tinystories.json")["input"] == str(sample)


def test_local_text_and_jsonl(tmp_path, capsys):
    txt = tmp_path / "stories.txt"
    txt.write_text(f"First story.\nTwo lines.\n{EOS_TOKEN}\n\nSecond story.\n{EOS_TOKEN}\n")
    code, _, _ = run_main(dt.main, ["--source", "local", "--input", str(txt), "--data_dir", str(tmp_path)], capsys)
    assert code == 0
    assert read_documents(tmp_path / "raw" / "tinystories.txt") == ["First story.\nTwo lines.", "Second story."]
    jsonl = tmp_path / "stories.jsonl"
    jsonl.write_text("".join(json.dumps({"story": f"Tale {i}.", "id": i}) + "\n" for i in range(6)))
    code, _, _ = run_main(dt.main, ["--source", "local", "--input", str(jsonl), "--text_field", "story",
                                    "--max_stories", "4", "--data_dir", str(tmp_path)], capsys)
    assert code == 0 and read_documents(tmp_path / "raw" / "tinystories.txt") == [f"Tale {i}." for i in range(4)]


def test_tinystories_user_errors(tmp_path, capsys):
    d = ["--data_dir", str(tmp_path)]
    jsonl = tmp_path / "s.jsonl"
    jsonl.write_text(json.dumps({"story": "x"}) + "\n")
    assert "has no field 'text' (fields: story)" in user_error(dt.main, ["--source", "local", "--input", str(jsonl), *d], capsys)
    assert "--text_field" in user_error(dt.main, ["--source", "local", "--input", str(jsonl), *d], capsys)
    (tmp_path / "empty.txt").write_text("\n")
    assert "is empty" in user_error(dt.main, ["--source", "local", "--input", str(tmp_path / "empty.txt"), *d], capsys)
    assert "not found" in user_error(dt.main, ["--source", "local", "--input", str(tmp_path / "nope.txt"), *d], capsys)
    (tmp_path / "plain.txt").write_text("no separators here\n")
    assert "separator" in user_error(dt.main, ["--source", "local", "--input", str(tmp_path / "plain.txt"), *d], capsys)
    (tmp_path / "bad.jsonl").write_text("{not json}\n")
    assert "not valid JSON" in user_error(dt.main, ["--source", "local", "--input", str(tmp_path / "bad.jsonl"), *d], capsys)
    assert "needs --input" in user_error(dt.main, ["--source", "local", *d], capsys)
    assert "--max_stories" in user_error(dt.main, ["--source", "builtin", "--max_stories", "0", *d], capsys)


# ----------------------------------------------------------------------------- RL prompts
def read_prompts(data_dir) -> list[dict]:
    lines = (data_dir / "prompts" / "rl_prompts.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(ln) for ln in lines]


def test_builtin_prompts(tmp_path, capsys):
    code, out, _ = run_main(dp.main, ["--source", "builtin", "--builtin_prompts", "21", "--data_dir", str(tmp_path)], capsys)
    assert code == 0 and len(out.strip().splitlines()) == 1
    prompts = read_prompts(tmp_path)
    assert len(prompts) == 21 and {p["task"] for p in prompts} == BUILTIN_TASKS
    assert all(set(p) == {"prompt", "answer", "task", "source"} and p["source"] == "builtin" for p in prompts)
    meta = sidecar(tmp_path / "prompts" / "rl_prompts.json")
    assert meta["num_prompts"] == 21 and sum(meta["by_task"].values()) == 21


def test_local_gsm8k_prompts(tmp_path, capsys, shared_data):
    gsm8k = shared_data / "gsm8k" / "train.jsonl"
    code, _, _ = run_main(dp.main, ["--source", "local", "--input", str(gsm8k), "--max_prompts", "400",
                                    "--builtin_prompts", "7", "--data_dir", str(tmp_path)], capsys)
    assert code == 0
    prompts = read_prompts(tmp_path)
    math = {p["prompt"]: p["answer"] for p in prompts if p["task"] == "gsm8k"}
    assert len(prompts) == 407 and len(math) == 400
    raw = [json.loads(ln) for ln in gsm8k.read_text(encoding="utf-8").splitlines()[:400]]
    for r in raw:  # the reference: the text after '####', commas removed
        assert math[r["question"].strip()] == re.search(r"####\s*(\S+)\s*$", r["answer"])[1].replace(",", "")
    assert math[raw[0]["question"]] == "72"
    assert any("," in r["answer"].split("####")[1] for r in raw)  # the comma case is covered


def test_prompts_hub_fallback_and_no_fallback(tmp_path, closed_port_env):
    proc = run_script(["data_pipeline/download/download_prompts.py", "--builtin_prompts", "14",
                       "--data_dir", str(tmp_path)], env=closed_port_env)
    assert proc.returncode == 0, proc.stderr
    assert any(ln.startswith("WARNING") and "FALLING BACK" in ln for ln in proc.stderr.splitlines())
    assert len(read_prompts(tmp_path)) == 14
    proc = run_script(["data_pipeline/download/download_prompts.py", "--no_fallback",
                       "--data_dir", str(tmp_path / "x")], env=closed_port_env)
    assert "--no_fallback" in assert_user_error(proc)


def test_prompts_from_hub(tmp_path, capsys, fake_hub):
    calls = fake_hub(rows=[{"question": "What is 1,000 + 234?", "answer": "Add.\n#### 1,234"}] * 3)
    code, _, _ = run_main(dp.main, ["--builtin_prompts", "0", "--data_dir", str(tmp_path)], capsys)
    assert code == 0 and calls == [("openai/gsm8k", "main", "train", True)]
    assert read_prompts(tmp_path) == [{"prompt": "What is 1,000 + 234?", "answer": "1234", "task": "gsm8k",
                                       "source": "openai/gsm8k:main/train"}] * 3


def test_prompts_user_errors(tmp_path, capsys):
    d = ["--data_dir", str(tmp_path)]
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"text": "hello"}) + "\n")
    assert "no field 'prompt' (fields: text)" in user_error(dp.main, ["--source", "local", "--input", str(f), *d], capsys)
    f.write_text(json.dumps({"question": "q?", "answer": "no final line"}) + "\n")
    assert "####" in user_error(dp.main, ["--source", "local", "--input", str(f), *d], capsys)
    assert "no prompts" in user_error(dp.main, ["--source", "builtin", "--builtin_prompts", "0", *d], capsys)
    assert "needs --input" in user_error(dp.main, ["--source", "local", *d], capsys)
    assert "only used with --source local" in user_error(dp.main, ["--input", str(f), *d], capsys)


def test_probe_reports_offline_and_unreachable(monkeypatch, closed_port_env):
    assert "cannot reach http://127.0.0.1" in sources.probe_hub("x/y", timeout=2)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "true")
    assert sources.probe_hub("x/y", timeout=2) == "HF_DATASETS_OFFLINE is set"
