"""Smoke test of benchmarks/preference_speed.py: the smallest run still drives both trainers.

One measured DPO step of config A with a precomputed reference, ours (the align stage) and
TRL's DPOTrainer, batch 1: the JSON has both sides, and they trained the same thing (the
reward margins agree), which catches API drift on either side.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def test_preference_speed_smallest_run(tmp_path):
    pytest.importorskip("trl")
    pytest.importorskip("datasets")
    out = tmp_path / "result.json"
    cmd = [sys.executable, str(REPO / "benchmarks" / "preference_speed.py"), "--quick", "--variants", "precompute",
           "--steps", "1", "--warmup", "0", "--pairs", "2", "--batch_size", "1", "--threads", "1", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report == json.loads(proc.stdout)
    res = report["configs"]["A"]
    assert res["logits_max_abs_diff_ours_vs_transformers"] < 1e-4
    for variant in ("ours_precompute", "trl_precompute"):
        r = res["variants"][variant]
        assert r["steps_measured"] == 1 and r["steps_per_s"] > 0 and r["peak_rss_mb"] > 0
        assert r["precomputed_pairs"] > 0 and r["reference_setup_s"] > 0
        assert r["activation_checkpointing"] is False
    comp = res["comparisons"]["precompute"]
    assert comp["speedup_ours_vs_trl"] > 0
    assert comp["reward_margin_max_abs_diff"] < 1e-3
