"""Sampler: masks, penalties, greedy, seeds and log-probabilities on hand-checkable numbers."""
import math

import pytest
import torch

from inference.engine.sampling import (
    SamplingParams,
    apply_penalties,
    make_generator,
    sample,
    top_k_top_p_min_p_mask,
)

PROBS = [0.5, 0.2, 0.15, 0.1, 0.05]
PERM = [3, 0, 4, 1, 2]  # token PERM[i] has probability PROBS[i]: the masks must not assume sorted input


def _logits(probs=PROBS, perm=PERM) -> torch.Tensor:  # (1, 5)
    out = torch.empty(1, len(probs))
    for p, token in zip(probs, perm):
        out[0, token] = math.log(p)
    return out


def _kept(top_k=0, top_p=1.0, min_p=0.0) -> set[int]:
    removed = top_k_top_p_min_p_mask(
        _logits(), torch.tensor([top_k]), torch.tensor([[top_p]]), torch.tensor([[min_p]])
    )
    return {t for t in range(5) if not removed[0, t]}


def _tokens(ranks) -> set[int]:  # probability ranks -> token ids
    return {PERM[r] for r in ranks}


@pytest.mark.parametrize(
    "kwargs, ranks",
    [
        (dict(), [0, 1, 2, 3, 4]),
        (dict(top_k=2), [0, 1]),
        (dict(top_k=9), [0, 1, 2, 3, 4]),
        (dict(top_p=0.6), [0, 1]),  # mass of better tokens: 0, .5, .7, ... -> keep while < .6
        (dict(top_p=0.75), [0, 1, 2]),  # .7 < .75 keeps the third
        (dict(top_p=0.3), [0]),
        (dict(min_p=0.25), [0, 1, 2]),  # threshold .25 * .5 = .125: .15 stays, .1 goes
        (dict(min_p=1.0), [0]),
        (dict(top_p=0.8), [0, 1, 2]),  # .7 < .8
        (dict(top_k=3, top_p=0.8), [0, 1]),  # after top-3: .588, .235, .176 -> .824 >= .8 drops the third
    ],
)
def test_truncation_masks(kwargs, ranks):
    assert _kept(**kwargs) == _tokens(ranks)


def test_truncation_parameters_per_row_in_one_batch():
    removed = top_k_top_p_min_p_mask(
        _logits().expand(4, 5), torch.tensor([2, 0, 0, 3]), torch.tensor([[1.0], [0.75], [1.0], [0.8]]),
        torch.tensor([[0.0], [0.0], [0.25], [0.0]]),
    )
    kept = [{t for t in range(5) if not removed[i, t]} for i in range(4)]
    assert kept == [_tokens([0, 1]), _tokens([0, 1, 2]), _tokens([0, 1, 2]), _tokens([0, 1])]


def test_sampled_tokens_stay_inside_the_truncated_set():
    n = 400
    # temperature 3 comes first: probability ratios to the best become (p / .5) ** (1/3) =
    # 1, .74, .67, .58, .46, so min_p=.5 drops only the last token
    params = [SamplingParams(top_k=2), SamplingParams(top_p=0.75), SamplingParams(min_p=0.5, temperature=3.0)] * n
    out = sample(_logits().expand(3 * n, 5), params, [[0]] * (3 * n), [None] * (3 * n), [1] * (3 * n))
    tokens = out.token_ids.view(n, 3)
    for column, ranks in enumerate([[0, 1], [0, 1, 2], [0, 1, 2, 3]]):
        assert set(tokens[:, column].tolist()) == _tokens(ranks)  # every allowed token shows up, no other


def test_penalty_formulas():
    logits = torch.tensor([[2.0, -1.0, 0.5, 0.0, 3.0]])
    # prompt [0, 1], output [2, 2, 4]
    seen = torch.tensor([[True, True, True, False, True]])
    counts = torch.tensor([[0.0, 0.0, 2.0, 0.0, 1.0]])

    def run(r, pres, freq):
        col = lambda x: torch.tensor([[x]])  # noqa: E731
        return apply_penalties(logits, seen, counts, col(r), col(pres), col(freq))[0].tolist()

    assert run(2.0, 0.0, 0.0) == pytest.approx([1.0, -2.0, 0.25, 0.0, 1.5])  # CTRL: /2 positive, *2 negative
    assert run(1.0, 0.5, 0.0) == pytest.approx([2.0, -1.0, 0.0, 0.0, 2.5])  # presence: output tokens only
    assert run(1.0, 0.0, 0.25) == pytest.approx([2.0, -1.0, 0.0, 0.0, 2.75])  # frequency: 2 * .25, 1 * .25
    assert run(2.0, 0.5, 0.25) == pytest.approx([1.0, -2.0, -0.75, 0.0, 0.75])


def test_sample_applies_penalties_from_histories():
    logits = torch.tensor([[2.0, -1.0, 0.5, 0.0, 3.0]])
    params = SamplingParams(temperature=0, repetition_penalty=2.0, presence_penalty=0.5,
                            frequency_penalty=0.25, logprobs=5)
    out = sample(logits, [params], [[0, 1, 2, 2, 4]], [None], prompt_lens=[2])
    expected = torch.tensor([1.0, -2.0, -0.75, 0.0, 0.75]).log_softmax(-1)
    assert out.token_ids.tolist() == [0]  # 3.0 would win without penalties; 1.0 wins after
    got = dict(out.top_logprobs[0])
    assert [got[t] for t in range(5)] == pytest.approx(expected.tolist(), abs=1e-6)
    assert out.logprobs[0].item() == pytest.approx(expected[0].item(), abs=1e-6)


def test_greedy_and_mixed_batch():
    logits = torch.tensor([[0.1, 0.9, 0.3], [5.0, 0.0, 0.0], [0.0, 0.0, 7.0]])
    params = [SamplingParams(temperature=0), SamplingParams(temperature=0.5, top_k=1), SamplingParams(temperature=0)]
    out = sample(logits, params, [[0], [0], [0]], [None, make_generator(1), None], prompt_lens=[1, 1, 1])
    assert out.token_ids.tolist() == [1, 0, 2]
    assert out.top_logprobs is None


def test_sampling_frequencies_follow_temperature():
    torch.manual_seed(0)
    n = 20000
    logits = _logits().expand(n, 5)
    for temperature in (1.0, 0.5):
        params = [SamplingParams(temperature=temperature)] * n
        out = sample(logits, params, [[0]] * n, [None] * n, [1] * n)
        freq = torch.bincount(out.token_ids, minlength=5).float() / n
        target = torch.tensor(PROBS) ** (1 / temperature)
        target = target / target.sum()
        for p, token in zip(target.tolist(), PERM):
            assert freq[token].item() == pytest.approx(p, abs=0.015)


def test_seed_reproducible_and_independent_of_batch():
    torch.manual_seed(123)
    vocab = 1000
    a, b, c = (torch.randn(vocab) for _ in range(3))
    pa, pb = SamplingParams(seed=7, top_p=0.9), SamplingParams(seed=8, temperature=1.3)

    def run(order):
        logits = torch.stack([{"a": a, "b": b, "c": c}[k] for k in order])
        gens = {"a": make_generator(7), "b": make_generator(8), "c": None}
        par = {"a": pa, "b": pb, "c": SamplingParams()}
        streams = {k: [] for k in order}
        for _ in range(15):
            out = sample(logits, [par[k] for k in order], [[1]] * len(order), [gens[k] for k in order], [1] * len(order))
            for k, t in zip(order, out.token_ids.tolist()):
                streams[k].append(t)
        return streams

    first, second = run(["a", "c", "b"]), run(["b", "a"])
    assert first["a"] == second["a"] and first["b"] == second["b"]
    assert first["a"] != first["b"]


def test_logprobs_are_log_softmax_after_temperature():
    logits = _logits()
    params = SamplingParams(temperature=2.0, top_k=1, logprobs=5, seed=0)
    out = sample(logits, [params], [[0]], [make_generator(0)], [1])
    expected = (logits[0] / 2.0).log_softmax(-1)
    assert out.token_ids.item() == PERM[0]  # top_k=1
    assert out.logprobs.item() == pytest.approx(expected[PERM[0]].item(), abs=1e-6)
    top = out.top_logprobs[0]
    assert [t for t, _ in top] == PERM  # best first
    assert sum(math.exp(lp) for _, lp in top) == pytest.approx(1.0, abs=1e-5)


def test_top_logprobs_per_row():
    logits = torch.randn(3, 10)
    params = [SamplingParams(logprobs=2), SamplingParams(), SamplingParams(logprobs=0)]
    out = sample(logits, params, [[0]] * 3, [None] * 3, [1] * 3)
    assert [len(row) for row in out.top_logprobs] == [2, 0, 0]
    assert out.logprobs.shape == (3,)
    assert torch.all(out.logprobs <= 0)


@pytest.mark.parametrize(
    "kwargs",
    [dict(temperature=-0.1), dict(top_p=0.0), dict(top_p=1.5), dict(top_k=-1), dict(top_k=2.5),
     dict(min_p=1.2), dict(repetition_penalty=0), dict(presence_penalty=3), dict(frequency_penalty=-2.5),
     dict(seed="x"), dict(stop=[""]), dict(stop_token_ids=[-1]), dict(max_tokens=0), dict(logprobs=21),
     dict(ignore_eos=1), dict(temperature=float("nan")), dict(max_tokens=True)],
)
def test_bad_params_raise_one_line(kwargs):
    with pytest.raises(ValueError) as err:
        SamplingParams(**kwargs)
    message = str(err.value)
    assert "\n" not in message and next(iter(kwargs)) in message


def test_params_normalisation():
    p = SamplingParams(stop="###", max_tokens=None)
    assert p.stop == ["###"] and p.max_tokens is None and not p.greedy
    assert SamplingParams(temperature=0).greedy


def test_sample_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="logit rows"):
        sample(torch.zeros(2, 4), [SamplingParams()], [[0]], [None], [1])


def test_seeded_rows_follow_the_distribution_and_skip_masked_tokens():
    """Seeded rows sample by inverse CDF (one uniform each): frequencies match the probabilities,
    and a token removed by top-k never comes out."""
    from inference.engine.sampling import inverse_cdf_sample

    probs = torch.tensor([[0.5, 0.0, 0.3, 0.2]])
    n = 4000
    drawn = inverse_cdf_sample(probs.expand(n, 4), [make_generator(s) for s in range(n)])
    freq = torch.bincount(drawn, minlength=4).float() / n
    assert freq[1] == 0
    assert torch.allclose(freq, probs[0], atol=0.03), freq
    logits = _logits().expand(n, 5)
    params = [SamplingParams(temperature=1.0, top_k=2, seed=s) for s in range(n)]
    out = sample(logits, params, [[0]] * n, [make_generator(s) for s in range(n)], [1] * n)
    assert len(set(out.token_ids.tolist())) == 2
