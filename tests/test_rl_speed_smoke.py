"""Smoke test of benchmarks/rl_speed.py: the quick run drives every part of the benchmark.

Rollouts through our engine and through transformers ``generate`` (padded batch and
``num_return_sequences``) on the same weights, then the real GRPO stage in two worker processes
(``beta: 0`` and ``beta > 0`` with a frozen reference): the JSON has every figure, all
positive, both sides generated the same tokens, and the time split adds up to the step — which
catches API drift in the RL stage, the engine or transformers.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def test_rl_speed_quick_run(tmp_path):
    pytest.importorskip("transformers")
    out = tmp_path / "result.json"
    cmd = [sys.executable, str(REPO / "benchmarks" / "rl_speed.py"), "--quick", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report == json.loads(proc.stdout)
    assert report["benchmark"] == "rl_speed" and report["quick"] is True and report["params"] > 0

    roll = report["rollout"]
    assert roll["logits_max_abs_diff_ours_vs_transformers"] < 1e-4
    assert roll["generated_tokens_per_round"] == roll["rows"] * roll["max_new_tokens"] > 0
    sides = ("ours", "hf_padded_batch", "hf_num_return_sequences")
    for side in sides:
        assert roll["tokens_per_s"][side] > 0 and roll["seconds_median"][side] > 0
        assert len(roll["seconds_all"][side]) == roll["rounds"]
    for side in sides[1:]:
        assert roll[f"speedup_vs_{side}"] > 0
    assert isinstance(roll["goal_speedup_vs_hf_padded_batch_ge_3x"], bool)

    grpo = report["grpo_step"]
    beta = grpo["config"]["beta"]
    assert set(grpo["variants"]) == {"beta_0", f"beta_{beta:g}"}
    for name, v in grpo["variants"].items():
        assert v["reference"] == ("none" if name == "beta_0" else "frozen")
        assert v["steps_measured"] == grpo["config"]["measured_steps"] >= 1
        for key in ("step_s_median", "generation_reward_s_median", "update_s_median", "peak_rss_mb",
                    "rss_after_imports_mb", "completion_length_mean", "generated_tokens_per_s_in_step"):
            assert v[key] > 0, (name, key, v[key])
        assert v["logps_s_median"] >= 0
        assert v["peak_rss_steps_mb"] is None or 0 < v["peak_rss_steps_mb"] <= v["peak_rss_mb"]
        assert v["rss_after_imports_mb"] <= v["peak_rss_setup_mb"] <= v["peak_rss_mb"]
        parts = v["all_steps"]
        for i, step in enumerate(parts["step_s"]):  # the split adds up to the step
            total = parts["generation_reward_s"][i] + parts["logps_s"][i] + parts["update_s"][i]
            assert abs(total - step) < 1e-3
    mem = grpo["peak_rss"]
    assert mem["beta_0_peak_rss_mb"] > 0 and mem[f"beta_{beta:g}_peak_rss_mb"] > 0
    assert mem["peak_rss_ratio_beta_over_beta_0"] > 0
