"""The built-in stand-ins for GSM8K and MMLU (offline, no data, no directory named): loud, labelled,
and never taken when the user named a data directory."""
from __future__ import annotations

import random

import pytest

import eval.tasks.gsm8k as gsm8k_mod
import eval.tasks.mmlu as mmlu_mod
from eval.tasks import TaskSettings, builtin
from eval.tasks.gsm8k import GSM8KTask, extract
from eval.tasks.mmlu import MMLUTask
from utils.errors import UserError


def _offline(monkeypatch):
    def no_hub(*args, **kwargs):
        raise UserError("no data at gsm8k and the Hugging Face hub cannot be used (offline)")

    monkeypatch.setattr(gsm8k_mod, "hub_rows", no_hub)
    monkeypatch.setattr(mmlu_mod, "hub_rows", no_hub)


def test_choices_hold_the_answer_once_among_four_distinct_numbers():
    rng = random.Random(0)
    for value in (0, 1, 7, 20, 133):
        choices, answer = builtin.choices_for(value, rng)
        assert len(set(choices)) == 4 and choices[answer] == str(value)
        assert all(int(c) >= 0 for c in choices)


def test_gsm8k_records_follow_gsm8k_layout():
    train, test = builtin.gsm8k_records(5, 20)
    assert len(train) == 5 and len(test) == 20
    assert not {r["question"] for r in train} & {r["question"] for r in test}
    for r in test:
        n = r["answer"].rsplit("#### ", 1)[1]
        assert extract(r["answer"], "strict-match") == n == extract(r["answer"], "flexible-extract")


@pytest.mark.parametrize("task_cls", [GSM8KTask, MMLUTask])
def test_offline_without_data_falls_back_loudly(tmp_path, monkeypatch, capsys, task_cls):
    _offline(monkeypatch)
    task = task_cls(TaskSettings(data_dir=tmp_path, limit=3, builtin_fallback=True))
    task.load(model=None)
    assert task.info["split"] == "builtin" and len(task.docs) == 3
    assert "FALLING BACK to the built-in arithmetic problems" in capsys.readouterr().err


@pytest.mark.parametrize("task_cls", [GSM8KTask, MMLUTask])
def test_a_named_data_directory_never_falls_back(tmp_path, monkeypatch, task_cls):
    _offline(monkeypatch)
    with pytest.raises(UserError, match="hub cannot be used"):
        task_cls(TaskSettings(data_dir=tmp_path, limit=3, builtin_fallback=False)).load(model=None)
