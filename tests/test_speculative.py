"""Speculative decoding keeps the target model's output: greedy exactly, sampling in distribution."""
from __future__ import annotations

import random

import pytest
import torch

from engine_fixtures import save_model
from inference.engine.llm_engine import LLMEngine
from inference.engine.loading import load_model
from inference.engine.sampling import SamplingParams, sample
from inference.engine.speculative import sampling_distributions, verify_draft
from model import get_preset
from serving_fixtures import make_tokenizer
from utils.errors import UserError

VOCAB = 320


# ---------------------------------------------------------------------------- accept / reject
def test_verify_draft_keeps_the_target_distribution() -> None:
    # hand-built target p and draft q over 4 tokens, 2 drafts; q is far from p
    p = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.5, 0.0, 0.25, 0.25], [0.25] * 4])
    q = torch.tensor([[0.4, 0.3, 0.2, 0.1], [0.1, 0.3, 0.1, 0.5]])
    gen = torch.Generator().manual_seed(0)
    n = 10000
    drafts = torch.stack([torch.multinomial(q[i], n, replacement=True, generator=gen) for i in range(2)], 1)
    first, second = torch.zeros(4), torch.zeros(4)
    num_second = 0
    for d in drafts.tolist():
        out = verify_draft(p, q, d, gen)
        first[out[0]] += 1
        if len(out) > 1:  # d_1 accepted: the next token is distributed as p_2
            second[out[1]] += 1
            num_second += 1
    tol = 4 * (0.25 / n) ** 0.5
    assert torch.allclose(first / n, p[0], atol=tol)
    assert torch.allclose(second / num_second, p[1], atol=4 * (0.25 / num_second) ** 0.5)
    assert second[1] == 0  # a token the target gives probability 0 is never emitted


def test_verify_draft_greedy() -> None:
    one_hot = torch.eye(5)
    p = one_hot[[2, 4, 1]]  # target argmax tokens 2, 4, then 1
    assert verify_draft(p, one_hot[[2, 4]], [2, 4]) == [2, 4, 1]  # all accepted + bonus
    assert verify_draft(p, one_hot[[2, 0]], [2, 0]) == [2, 4]  # second rejected, corrected
    assert verify_draft(p, one_hot[[3, 4]], [3, 4]) == [2]


def test_sampling_distributions_are_what_sample_draws() -> None:
    torch.manual_seed(0)
    logits = torch.randn(1, 6) * 2
    params = [
        SamplingParams(temperature=0.7),
        SamplingParams(temperature=1.3, top_k=3),
        SamplingParams(temperature=1.0, top_p=0.8, repetition_penalty=1.5, presence_penalty=0.5),
        SamplingParams(temperature=1.0, min_p=0.2, frequency_penalty=1.0),
    ]
    history, prompt_len = [0, 3, 3, 5], 2
    n = 4000
    for p in params:
        probs, logprobs = sampling_distributions(logits, [p], [history], [prompt_len])
        result = sample(logits.expand(n, 6), [p] * n, [history] * n, [None] * n, [prompt_len] * n)
        freq = torch.bincount(result.token_ids, minlength=6).float() / n
        assert torch.allclose(freq, probs[0], atol=0.035), (p, freq, probs)
        assert torch.allclose(result.logprobs, logprobs[0, result.token_ids], atol=1e-6)
    probs, _ = sampling_distributions(logits, [SamplingParams(temperature=0)], [history], [prompt_len])
    assert probs[0].tolist() == torch.nn.functional.one_hot(logits.argmax(), 6).float().tolist()


# ---------------------------------------------------------------------------- in the engine
@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("spec")
    tok = make_tokenizer(root / "tokenizer")
    return {
        "gqa": save_model(get_preset("tiny", vocab_size=VOCAB), root / "gqa", tok),
        "mla": save_model(get_preset("tiny-deepseek_v3", vocab_size=VOCAB), root / "mla", tok),
        "draft": save_model(get_preset("tiny", vocab_size=VOCAB, n_layers=1, dim=32, n_heads=2, n_kv_heads=1),
                            root / "draft", tok, seed=1),
    }


def _run(eng: LLMEngine, prompt_list, params) -> list[list[int]]:
    ids = [eng.add_request(p, params) for p in prompt_list]
    tokens = {rid: [] for rid in ids}
    while eng.has_unfinished():
        for out in eng.step():
            tokens[out.request_id] += out.new_token_ids
    return [tokens[rid] for rid in ids]


@pytest.mark.parametrize("target,draft", [("gqa", "draft"), ("gqa", "gqa"), ("mla", "draft")])
def test_speculative_greedy_equals_target_greedy(models, target, draft) -> None:
    rng = random.Random(0)
    plist = [[rng.randrange(VOCAB) for _ in range(n)] for n in (4, 13, 9)]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    kw = dict(device="cpu", dtype="fp32", block_size=4)
    plain = _run(LLMEngine(models[target], **kw), plist, params)
    spec_engine = LLMEngine(models[target], draft_checkpoint=models[draft], num_speculative_tokens=3, **kw)
    assert _run(spec_engine, plist, params) == plain
    rate = spec_engine.speculative.acceptance_rate
    if draft == target:  # the draft is the target: every draft is accepted
        assert rate > 0.95
    assert 0.0 <= rate <= 1.0


def test_speculative_sampling_keeps_the_target_distribution(tmp_path) -> None:
    # vocab of 8 so that the next-token distribution is measurable; large weights make p and q
    # far apart (a draft that were simply trusted would fail the test)
    small = dict(vocab_size=8, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_hidden_dim=64, init_std=0.6)
    target = save_model(get_preset("tiny", **small), tmp_path / "target", seed=0)
    draft = save_model(get_preset("tiny", **small), tmp_path / "draft", seed=1)
    prompt = [1, 2, 3]

    def marginal_of_second_token(ckpt) -> torch.Tensor:
        model = load_model(ckpt, torch.device("cpu"), torch.float32).model
        with torch.no_grad():
            p1 = model(torch.tensor([prompt]))[0, -1].softmax(-1)  # (8,)
            cont = torch.tensor([prompt + [t] for t in range(8)])
            p2 = model(cont)[:, -1].softmax(-1)  # (8, 8) p(t2 | t1)
        return p1 @ p2

    expected, draft_marginal = marginal_of_second_token(target), marginal_of_second_token(draft)
    n, tol = 1500, 0.045
    assert (expected - draft_marginal).abs().max() > 2 * tol  # the test can tell them apart
    eng = LLMEngine(target, device="cpu", dtype="fp32", block_size=4, draft_checkpoint=draft,
                    num_speculative_tokens=3)
    ids = [eng.add_request(prompt, SamplingParams(temperature=1.0, max_tokens=2, seed=i, ignore_eos=True))
           for i in range(n)]
    tokens = {rid: [] for rid in ids}
    while eng.has_unfinished():
        for out in eng.step():
            tokens[out.request_id] += out.new_token_ids
    second = torch.tensor([tokens[rid][1] for rid in ids])
    freq = torch.bincount(second, minlength=8).float() / n
    assert torch.allclose(freq, expected, atol=tol), (freq, expected)
    assert eng.speculative.num_proposed > 0


def test_incompatible_drafts_are_user_errors(models, tmp_path) -> None:
    other_vocab = save_model(get_preset("tiny", vocab_size=VOCAB + 8), tmp_path / "vocab")
    with pytest.raises(UserError, match="vocabulary"):
        LLMEngine(models["gqa"], device="cpu", draft_checkpoint=other_vocab)
    linear = save_model(get_preset("tiny", vocab_size=VOCAB, attention_type="linear"), tmp_path / "linear")
    with pytest.raises(UserError, match="linear attention"):
        LLMEngine(linear, device="cpu", draft_checkpoint=models["gqa"])
