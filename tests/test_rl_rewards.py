"""Reward functions of online RL (`align/rewards.py`): answer checking, the weighted sum, user
functions, the config's refusals and the reward-model reward.

References: the built-in problems' worked solutions (`data_pipeline.builtin.verifiable`), which
must all count as correct, and `align.score.score_batch` for the reward-model reward. The reward
model is tiny and random, with the SFT tests' tokenizer; no download.
"""
from __future__ import annotations

import json
import math
import shutil
import textwrap
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from align.rewards import (
    RewardFunctions,
    RewardSpec,
    extract_answer,
    extract_word_answer,
    format_reward,
    is_correct,
    normalize_number,
    verifiable_reward,
)
from data_pipeline.builtin.verifiable import TASKS, generate_problems
from model import get_preset
from test_reward_model import _random_reward_model
from test_sft import make_tokenizer, one_thread  # noqa: F401  (one_thread: autouse, one torch thread)
from utils.checkpoint import REWARD_MODEL, save_checkpoint
from utils.errors import UserError

CPU = torch.device("cpu")


def specs(*entries: dict) -> list[RewardSpec]:
    return [RewardSpec(**e) for e in entries]


# ---------------------------------------------------------------- answer extraction
@pytest.mark.parametrize("text, expected", [
    ("She has 1,000 + 234 = 1,234 apples.\n#### 1,234", "1234"),  # GSM8K
    ("#### 72", "72"),
    ("3 + 9 = 12. The answer is 12.", "12"),
    ("the answer is $1,234.50 in all", "1234.5"),
    ("The answer is -3.", "-3"),
    ("The answer is 5. No wait. The answer is 6", "6"),  # the last marker
    ("The answer is 4 apples and 2 pears", "4"),  # the first number after it
    ("2 bags of 3 is 6 apples", "6"),  # no marker: the last number
    ("10-3 = 7", "7"),
    ("3 + 4 makes 7. The answer is seven.", "7"),  # no number after the marker: the last number
    ("I do not know.", None),
    ("", None),
])
def test_extract_answer(text: str, expected) -> None:
    assert extract_answer(text) == expected


def test_normalize_number_and_word_answers() -> None:
    for raw, norm in [("1,234", "1234"), ("5.0", "5"), ("$12", "12"), ("-3", "-3"), ("2.50", "2.5"),
                      (" 7 ", "7"), ("+4", "4"), ("-0", "0")]:
        assert normalize_number(raw) == norm, raw
    for bad in ["abc", "", "1,2", "12a", "--3", "$"]:
        assert normalize_number(bad) is None, bad
    assert extract_word_answer("The hero is called Ruby. The answer is Ruby.") == "Ruby"
    assert extract_word_answer("the answer is: **blue**!") == "blue"
    assert extract_word_answer("The answer is red. Oh no, the answer is green") == "green"
    assert extract_word_answer("It was red.") is None
    assert extract_word_answer("The answer is ...") is None


def test_builtin_solutions_are_correct_and_wrong_ones_are_not() -> None:
    problems = generate_problems(3 * len(TASKS), seed=7)
    assert {p.task for p in problems} == set(TASKS)
    for p in problems:
        assert is_correct(p.solution, p.answer), (p.task, p.solution, p.answer)
        if normalize_number(p.answer) is not None:
            wrong = f"The answer is {int(p.answer) + 1}."
        else:
            wrong = "The answer is Nobody."
        assert not is_correct(wrong, p.answer), (p.task, wrong)
    # word answers: case, punctuation, and the last word when there is no answer line
    assert is_correct("The answer is **ruby**!", "Ruby") and is_correct("It was Red.", "red")
    assert not is_correct("The answer is blue. It was red", "red")  # the answer line decides
    # numeric answers compare as numbers
    assert is_correct("#### 1,234", "1234") and is_correct("The answer is 5.0", "5")
    assert is_correct("The answer is $12.", "12") and not is_correct("no idea", "12")
    records = [{"answer": p.answer} for p in problems]
    got = verifiable_reward([p.prompt for p in problems], [p.solution for p in problems], records)
    assert got == [1.0] * len(problems)
    with pytest.raises(UserError, match="record 0 has no \"answer\""):
        verifiable_reward(["q"], ["The answer is 3."], [{"prompt": "q"}])


def test_format_reward_default_and_custom_pattern() -> None:
    completions = ["So 2 + 2 = 4. The answer is 4.", "#### 1,234", "It is 4.", "The answer is", "<answer>4</answer>"]
    assert format_reward([], completions, []) == [1.0, 1.0, 0.0, 0.0, 0.0]
    assert format_reward([], completions, [], pattern=r"<answer>\d+</answer>") == [0.0, 0.0, 0.0, 0.0, 1.0]


# ---------------------------------------------------------------- the weighted sum
def test_weighted_sum_and_names() -> None:
    rewards = RewardFunctions(specs({"type": "verifiable"}, {"type": "format", "weight": 0.5},
                                    {"type": "format", "weight": -2.0, "pattern": "apple"},
                                    {"type": "format", "pattern": "pear", "name": "pears"}), None, CPU)
    assert rewards.names == ["verifiable", "format", "format_2", "pears"]
    prompts = ["How many?"] * 3
    completions = ["The answer is 4.", "apple: The answer is 5.", "4 pears"]
    total, parts = rewards(prompts, completions, [{"answer": "4"}] * 3)
    assert list(parts) == rewards.names
    assert parts["verifiable"].tolist() == [1.0, 0.0, 1.0]
    assert parts["format"].tolist() == [1.0, 1.0, 0.0]
    assert parts["format_2"].tolist() == [0.0, 1.0, 0.0]
    assert parts["pears"].tolist() == [0.0, 0.0, 1.0]
    assert total.dtype == torch.float32 and total.shape == (3,)
    assert total.tolist() == pytest.approx([1.5, 0.5 - 2.0, 2.0])
    empty, empty_parts = rewards([], [], [])
    assert empty.shape == (0,) and all(v.shape == (0,) for v in empty_parts.values())


# ---------------------------------------------------------------- python rewards
USER_MODULE = '''
import math

CALLS = []

def brevity(prompts, completions, records, **kwargs):
    CALLS.append((list(prompts), list(completions), [r["task"] for r in records]))
    return [float(len(c)) for c in completions]

def boom(prompts, completions, records):
    raise ValueError("bad input")

def nan(prompts, completions, records):
    return [0.0] * (len(completions) - 1) + [math.nan]

def short(prompts, completions, records):
    return [1.0]

def nothing(prompts, completions, records):
    return None

def words(prompts, completions, records):
    return ["high"] * len(completions)

NOT_CALLABLE = 3
'''


@pytest.fixture
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    name = f"rl_user_rewards_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(USER_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


def test_python_reward_is_called_and_weighted(user_module: str) -> None:
    rewards = RewardFunctions(specs({"type": "python", "function": f"{user_module}:brevity", "weight": 0.1},
                                    {"type": "verifiable"}), None, CPU)
    assert rewards.names == ["brevity", "verifiable"]
    records = [{"prompt": "p", "answer": "3", "task": "addition", "source": "builtin"}] * 2
    total, parts = rewards(["p", "p"], ["The answer is 3.", "no"], records)
    module = __import__(user_module)
    assert module.CALLS == [(["p", "p"], ["The answer is 3.", "no"], ["addition", "addition"])]
    assert parts["brevity"].tolist() == [16.0, 2.0]
    assert total.tolist() == pytest.approx([0.1 * 16 + 1.0, 0.1 * 2])


@pytest.mark.parametrize("fn, message", [
    ("boom", "reward python:{m}:boom raised ValueError: bad input"),
    ("nan", "reward python:{m}:nan returned NaN for completion 1"),
    ("short", "reward python:{m}:short returned 1 values for 2 completions"),
    ("nothing", "reward python:{m}:nothing returned None"),
    ("words", "reward python:{m}:words returned a non-number 'high' (str) for completion 0"),
])
def test_python_reward_failures_name_the_function(user_module: str, fn: str, message: str) -> None:
    rewards = RewardFunctions(specs({"type": "python", "function": f"{user_module}:{fn}"}), None, CPU)
    with pytest.raises(UserError) as err:
        rewards(["p", "p"], ["a", "b"], [{"answer": "1"}] * 2)
    assert str(err.value).startswith(message.format(m=user_module)), str(err.value)


def test_python_reward_import_errors(user_module: str) -> None:
    for function, message in [("no_such_module_xyz:fn", "cannot import module 'no_such_module_xyz'"),
                              (f"{user_module}:missing", "has no attribute 'missing'"),
                              (f"{user_module}:NOT_CALLABLE", "is a int, not a function")]:
        with pytest.raises(UserError, match=f"reward python:{function}: .*{message}"):
            RewardFunctions(specs({"type": "python", "function": function}), None, CPU)


# ---------------------------------------------------------------- config refusals
@pytest.mark.parametrize("entry, message", [
    ({"type": "judge"}, "type"),
    ({"type": "verifiable", "checkpoint": "rm"}, "`checkpoint` is only for rewards of type reward_model"),
    ({"type": "format", "function": "m:f"}, "`function` is only for rewards of type python"),
    ({"type": "python", "function": "m:f", "pattern": "x"}, "`pattern` is only for rewards of type format"),
    ({"type": "python", "function": "m:f", "batch_size": 4}, "`batch_size` is only for rewards of type reward_model"),
    ({"type": "reward_model"}, "needs `checkpoint`"),
    ({"type": "python"}, "needs `function`"),
    ({"type": "python", "function": "just_a_module"}, "must be \"package.module:function\""),
    ({"type": "format", "pattern": "(unclosed"}, "not a valid regex"),
    ({"type": "verifiable", "weight": math.nan}, "weight"),
    ({"type": "verifiable", "temperature": 1.0}, "temperature"),
])
def test_spec_refusals(entry: dict, message: str) -> None:
    with pytest.raises(ValidationError) as err:
        RewardSpec(**entry)
    assert message in str(err.value), str(err.value)


# ---------------------------------------------------------------- reward models
@pytest.fixture(scope="module")
def rm_setup(tmp_path_factory) -> dict[str, Path]:
    """A tokenizer (the policy's) and a tiny random reward model trained with it."""
    root = tmp_path_factory.mktemp("rl_rm")
    tok = make_tokenizer(root / "tokenizer")
    cfg = get_preset("tiny-llama3", vocab_size=1024, init_std=0.1, max_seq_len=128)
    save_checkpoint(root / "rm", _random_reward_model(cfg).state_dict(),
                    {**cfg.model_dump(mode="json"), "task": REWARD_MODEL}, tokenizer_dir=tok)
    return {"tokenizer": tok / "tokenizer.json", "rm": root / "rm"}


def test_reward_model_reward_equals_score_batch(rm_setup: dict[str, Path]) -> None:
    from align.score import load_reward_model, score_batch

    prompts = ["Tell me a story about a cat.", "What color was the ball?", "Hi"]
    completions = ["Once upon a time, a little cat found a red ball.", "The answer is red.", "Hello!"]
    rewards = RewardFunctions(specs({"type": "reward_model", "checkpoint": str(rm_setup["rm"]), "weight": 2.0,
                                     "batch_size": 2},
                                    {"type": "reward_model", "checkpoint": str(rm_setup["rm"]), "weight": 0.0}),
                              rm_setup["tokenizer"], CPU)
    assert rewards.names == ["reward_model", "reward_model_2"]
    total, parts = rewards(prompts, completions, [{}] * 3)
    model, ct = load_reward_model(rm_setup["rm"], "cpu")
    expected = score_batch(model, ct, prompts, completions, batch_size=2)
    assert len(set(expected)) == 3
    assert parts["reward_model"].tolist() == pytest.approx(expected, abs=1e-5)
    assert parts["reward_model_2"].tolist() == pytest.approx(expected, abs=1e-5)
    assert total.tolist() == pytest.approx([2 * e for e in expected], abs=1e-5)


def test_reward_model_with_another_tokenizer_is_refused(rm_setup: dict[str, Path], tmp_path: Path) -> None:
    doc = json.loads(rm_setup["tokenizer"].read_text())
    # the same tokenizer written differently (indent, the other merges spelling, padding set) passes
    same = tmp_path / "same"
    shutil.copytree(rm_setup["rm"], same)
    merges = [m.split(" ") if isinstance(m, str) else " ".join(m) for m in doc["model"]["merges"]]
    padding = {"strategy": "BatchLongest", "direction": "Right", "pad_to_multiple_of": None, "pad_id": 0,
               "pad_type_id": 0, "pad_token": "<|pad|>"}
    doc_same = {**doc, "padding": padding, "model": {**doc["model"], "merges": merges}}
    (same / "tokenizer.json").write_text(json.dumps(doc_same, indent=4))
    spec = {"type": "reward_model", "checkpoint": str(same)}
    RewardFunctions(specs(spec), rm_setup["tokenizer"], CPU)
    # two tokens' ids swapped: another tokenizer
    other = tmp_path / "other"
    shutil.copytree(rm_setup["rm"], other)
    vocab = dict(doc["model"]["vocab"])
    a, b = sorted(t for t in vocab if t.isalpha() and len(t) > 3)[:2]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (other / "tokenizer.json").write_text(json.dumps({**doc, "model": {**doc["model"], "vocab": vocab}}))
    with pytest.raises(UserError, match=r"reward reward_model:.*other: the reward model's tokenizer .* differs "
                                        r"from the policy's .*different token ids"):
        RewardFunctions(specs({"type": "reward_model", "checkpoint": str(other)}), rm_setup["tokenizer"], CPU)
