"""Evaluation pieces in isolation: the batched log-likelihood engine, metrics, task data handling."""
from __future__ import annotations

import math
import random

import pytest
import torch

import eval.models as models
from eval.api_model import cut_at_stop
from eval.config import EvalConfig
from eval.models import LocalLM
from eval.requests import GenerateUntil, Loglikelihood
from eval.tasks import mean_stderr, pooled_stderr
from eval.tasks.gsm8k import draw_shots, exact_match, extract
from eval.tasks.mmlu import MMLUTask, build_context, question_text
from eval.tasks.ppl import eos_documents, ratio_and_stderr, split_documents
from eval.tasks import TaskSettings
from serving_fixtures import make_checkpoint
from utils.config import validate
from utils.errors import UserError


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    ckpt = make_checkpoint(tmp_path_factory.mktemp("eval_tasks") / "ckpt", max_seq_len=256)
    return LocalLM(ckpt, device="cpu", dtype="float32", batch_size=4)


@torch.no_grad()
def _reference(lm: LocalLM, ctx: list[int], cont: list[int]) -> tuple[float, bool]:
    """One full forward per request, no batching, no cache (lm-eval's arithmetic)."""
    row = (ctx + cont)[-(lm.max_length + 1):][:-1]
    logp = torch.log_softmax(lm.model(torch.tensor([row]))[0].float(), dim=-1)[-len(cont):]
    target = torch.tensor(cont)
    return float(logp.gather(1, target[:, None]).sum()), bool((logp.argmax(-1) == target).all())


def test_batched_shared_prefix_loglikelihoods_equal_one_forward_each(lm, monkeypatch):
    rng = random.Random(0)
    vocab = lm.loaded.config.vocab_size
    prefix = [rng.randrange(vocab) for _ in range(40)]
    pairs = []
    for _ in range(11):  # shared prefix, various continuations (one and several tokens, repeated inputs)
        ctx = prefix + [rng.randrange(vocab) for _ in range(rng.randrange(1, 12))]
        for n in (1, 1, 3):
            pairs.append((ctx, [rng.randrange(vocab) for _ in range(n)]))
    pairs.append(([5] * 300, [7, 8]))  # longer than the model: left-truncated
    pairs.append(([rng.randrange(vocab) for _ in range(9)], [1]))  # shares nothing
    expected = [_reference(lm, c, t) for c, t in pairs]
    calls = []
    real = models.LocalLM._prefill
    monkeypatch.setattr(models.LocalLM, "_prefill", lambda self, *a: calls.append(len(a[0])) or real(self, *a))
    got = lm.loglikelihood_tokens(pairs)
    assert calls and min(calls) >= 40  # the shared prefix ran once per batch
    for (ll, greedy), (ref_ll, ref_greedy) in zip(got, expected):
        assert ll == pytest.approx(ref_ll, abs=1e-4) and greedy == ref_greedy


def test_encode_pair_moves_trailing_spaces_and_uses_prefix_token(lm):
    ctx, cont = lm.encode_pair("Answer: ", "B")
    assert ctx == lm.tok_encode("Answer:") and ctx + cont == lm.tok_encode("Answer: B")
    ctx, cont = lm.encode_pair("", "Once upon a time")
    assert ctx == [lm.prefix_token_id] and cont == lm.tok_encode("Once upon a time")
    assert lm.loglikelihood([Loglikelihood("The cat", " sat")])[0][0] < 0


def test_generation_cuts_at_stop_strings_and_truncates_long_prompts(lm):
    outs = lm.generate_until([GenerateUntil("Once upon a time", ("e",), 20),
                              GenerateUntil("Tom " * 400, (), 5, temperature=1.0, n=3, seed=1)])
    assert "e" not in outs[0][0] and len(outs[1]) == 3


def test_metric_helpers():
    assert math.isnan(mean_stderr([1.0]))
    assert mean_stderr([0.0, 1.0, 1.0, 0.0]) == pytest.approx(math.sqrt(1 / 3 / 4))
    # pooling the subjects' stderrs equals the stderr of all samples together (lm-eval's claim, equal sizes)
    a, b = [1.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 0.0]
    assert pooled_stderr([mean_stderr(a), mean_stderr(b)], [4, 4]) == pytest.approx(mean_stderr(a + b), rel=0.1)
    r, se = ratio_and_stderr([10.0, 20.0], [5.0, 10.0])
    assert r == 2.0 and se == 0.0
    assert split_documents("a\n\n b \n\n\n<x>") == ["a", " b ", "<x>"]
    assert split_documents("one<|endoftext|>\ntwo\n\nstill two<|endoftext|>") == ["one", "two\n\nstill two"]


def test_a_pretrain_bin_without_offsets_splits_at_eos() -> None:
    import numpy as np

    stream = np.array([5, 6, 0, 0, 7, 0, 8, 9], dtype=np.uint16)  # the stream may end mid-document
    assert eos_documents(stream, eos_id=0) == [(5, 6), (7,), (8, 9)]
    assert cut_at_stop("abc\ndef x\nclass", ["\nclass", "\ndef"]) == "abc"


def test_gsm8k_filters_and_shots():
    assert extract("so 3 + 4 = 7\n#### 7\n\n#### 9", "strict-match") == "7"
    assert extract("It costs $1,200.", "flexible-extract") == "$1,200."
    assert extract("nothing here", "flexible-extract") == "[invalid]"
    assert exact_match("$1,200.", "... #### 1200") and not exact_match("[invalid]", "#### 3")
    pool = [{"question": str(i), "answer": "#### 1"} for i in range(10)]
    drawn = draw_shots(pool, pool[:3], 4, 1234, same_split=True)
    assert all(len(s) == 4 and doc not in s for s, doc in zip(drawn, pool[:3]))
    assert draw_shots(pool, pool[:3], 4, 1234, True) == drawn  # seeded


def test_mmlu_prompt_and_aggregates(shared_data, lm):
    task = MMLUTask(TaskSettings(data_dir=shared_data, limit=2, shots=2))
    task.load(lm)
    doc = task.docs[0]
    assert build_context(doc["shots"], doc).startswith(
        "The following are multiple choice questions (with answers) about abstract algebra.\n\n")
    context = build_context(doc["shots"], doc)
    assert context.endswith(question_text(doc)) and context.count("\nAnswer: ") == 2 and context.count("\n\n") == 3
    records = [{"subject": "anatomy", "acc": 1.0}, {"subject": "anatomy", "acc": 0.0},
               {"subject": "formal_logic", "acc": 1.0}, {"subject": "formal_logic", "acc": 1.0},
               {"subject": "formal_logic", "acc": 1.0}, {"subject": "formal_logic", "acc": 0.0}]
    m = task.aggregate(records)
    assert m["acc"]["value"] == pytest.approx(4 / 6) and m["acc_macro"]["value"] == pytest.approx((0.5 + 0.75) / 2)
    assert m["acc_stem"]["value"] == 0.5 and m["acc_humanities"]["value"] == 0.75 and "acc_other" not in m


def test_config_is_strict():
    with pytest.raises(UserError, match="did you mean `limit`"):
        validate({"model": {"checkpoint": "x"}, "eval": {"limt": 3}}, EvalConfig)
    with pytest.raises(UserError, match="did you mean gsm8k"):
        validate({"model": {"checkpoint": "x"}, "eval": {"tasks": "gsm8", "limit": 3}}, EvalConfig)
    with pytest.raises(UserError, match="adapter needs a checkpoint"):
        validate({"model": {"base_url": "http://x", "adapter": "a"}}, EvalConfig)
    cfg = validate({"model": {"checkpoint": "x"}, "eval": {"tasks": "mmlu, gsm8k"}}, EvalConfig)
    assert cfg.eval.tasks == ["mmlu", "gsm8k"]
