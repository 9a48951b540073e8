"""The pure alignment losses (`align/losses.py`) on numbers computed by hand from each paper's
formula, and response-only log-probs with uneven lengths and either padding side."""
from __future__ import annotations

import math

import pytest
import torch

from align.losses import (dpo_loss, kto_kl_estimate, kto_loss, log1mexp, orpo_odds_ratio, reward_model_loss,
                          sequence_logps, simpo_loss)


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def approx(value: torch.Tensor, expected: list[float] | float) -> None:
    assert value.tolist() == pytest.approx(expected, rel=1e-9, abs=1e-12)


# policy chosen/rejected and reference chosen/rejected log-probs of two pairs
PC, PR, RC, RR = t(-10.0, -4.0), t(-12.0, -3.0), t(-11.0, -4.5), t(-11.5, -3.5)
# h = (PC - RC) - (PR - RR): pair 0: 1 - (-0.5) = 1.5; pair 1: 0.5 - 0.5 = 0.0
H = [1.5, 0.0]


def test_dpo_sigmoid_by_hand() -> None:
    out = dpo_loss(PC, PR, RC, RR, beta=0.5)
    approx(out.losses, [-math.log(sig(0.5 * h)) for h in H])
    approx(out.chosen_rewards, [0.5 * 1.0, 0.5 * 0.5])
    approx(out.rejected_rewards, [0.5 * -0.5, 0.5 * 0.5])


def test_cdpo_label_smoothing_by_hand() -> None:
    out = dpo_loss(PC, PR, RC, RR, beta=0.5, label_smoothing=0.1)
    approx(out.losses, [-0.9 * math.log(sig(0.5 * h)) - 0.1 * math.log(sig(-0.5 * h)) for h in H])


def test_robust_by_hand() -> None:
    eps = 0.2
    out = dpo_loss(PC, PR, RC, RR, beta=0.5, loss_type="robust", label_smoothing=eps)
    approx(out.losses, [(-(1 - eps) * math.log(sig(0.5 * h)) + eps * math.log(sig(-0.5 * h))) / (1 - 2 * eps)
                        for h in H])
    with pytest.raises(ValueError):
        dpo_loss(PC, PR, RC, RR, beta=0.5, loss_type="robust", label_smoothing=0.5)


def test_hinge_by_hand() -> None:
    out = dpo_loss(PC, PR, RC, RR, beta=0.5, loss_type="hinge")
    approx(out.losses, [max(0.0, 1 - 0.5 * h) for h in H])  # 0.25, 1.0


def test_ipo_uses_length_averaged_log_ratios() -> None:
    lc, lr = t(4.0, 2.0), t(5.0, 1.0)
    out = dpo_loss(PC, PR, RC, RR, beta=0.5, loss_type="ipo", chosen_lengths=lc, rejected_lengths=lr)
    # pair 0: 1.0/4 - (-0.5)/5 = 0.35; pair 1: 0.5/2 - 0.5/1 = -0.25; target 1/(2·0.5) = 1
    approx(out.losses, [(0.35 - 1.0) ** 2, (-0.25 - 1.0) ** 2])
    with pytest.raises(ValueError):
        dpo_loss(PC, PR, RC, RR, beta=0.5, loss_type="ipo")


def test_bco_pair_by_hand() -> None:
    out = dpo_loss(PC, PR, RC, RR, beta=0.5, loss_type="bco_pair")
    approx(out.losses, [-math.log(sig(0.5 * 1.0)) - math.log(sig(0.5 * 0.5)),
                        -math.log(sig(0.5 * 0.5)) - math.log(sig(-0.5 * 0.5))])


def test_dpo_gradient_raises_chosen_lowers_rejected() -> None:
    pc, pr = PC.clone().requires_grad_(), PR.clone().requires_grad_()
    dpo_loss(pc, pr, RC, RR, beta=0.1).losses.sum().backward()
    assert (pc.grad < 0).all() and (pr.grad > 0).all()


def test_orpo_odds_ratio_by_hand() -> None:
    c, r = t(-0.5, -2.0), t(-1.0, -0.1)
    out, log_odds = orpo_odds_ratio(c, r, beta=0.25)

    def odds(lp: float) -> float:
        p = math.exp(lp)
        return p / (1 - p)

    expect = [math.log(odds(a) / odds(b)) for a, b in zip(c.tolist(), r.tolist())]
    assert log_odds.tolist() == pytest.approx(expect, rel=1e-6)
    approx_f = [-0.25 * math.log(sig(x)) for x in expect]
    assert out.losses.tolist() == pytest.approx(approx_f, rel=1e-6)
    assert out.chosen_rewards.tolist() == pytest.approx([0.25 * -0.5, 0.25 * -2.0])


def test_log1mexp_is_stable_on_both_sides() -> None:
    x = t(-1e-10, -0.1, -math.log(2), -1.0, -50.0)
    expect = [math.log(-math.expm1(v)) for v in x.tolist()]
    assert log1mexp(x).tolist() == pytest.approx(expect, rel=1e-9)


def test_simpo_by_hand() -> None:
    c, r = t(-1.0, -2.0), t(-1.5, -1.0)
    out = simpo_loss(c, r, beta=2.0, gamma=0.5)
    # z = 2 (c - r) - 0.5 = 0.5, -2.5
    approx(out.losses, [-math.log(sig(0.5)), -math.log(sig(-2.5))])
    smooth = simpo_loss(c, r, beta=2.0, gamma=0.5, label_smoothing=0.1)
    approx(smooth.losses, [-0.9 * math.log(sig(z)) - 0.1 * math.log(sig(-z)) for z in (0.5, -2.5)])


def test_kto_by_hand() -> None:
    logps, ref = t(-3.0, -5.0, -4.0), t(-4.0, -4.0, -4.5)  # ratios 1, -1, 0.5
    desirable = torch.tensor([True, False, True])
    kl = kto_kl_estimate(t(0.6).sum(), 2.0)  # mean 0.3
    approx(kl, 0.3)
    losses, rewards = kto_loss(logps, ref, desirable, kl, beta=0.5, desirable_weight=2.0, undesirable_weight=0.5)
    approx(losses, [2.0 * (1 - sig(0.5 * (1 - 0.3))), 0.5 * (1 - sig(0.5 * (0.3 + 1))),
                    2.0 * (1 - sig(0.5 * (0.5 - 0.3)))])
    approx(rewards, [0.5, -0.5, 0.25])
    approx(kto_kl_estimate(torch.tensor(-3.0), 4.0), 0.0)  # a negative estimate is clamped to 0


def test_reward_model_loss_by_hand() -> None:
    rc, rr = t(1.0, -0.5), t(0.0, 0.5)
    approx(reward_model_loss(rc, rr), [-math.log(sig(1.0)), -math.log(sig(-1.0))])
    approx(reward_model_loss(rc, rr, margin=0.5), [-math.log(sig(0.5)), -math.log(sig(-1.5))])
    approx(reward_model_loss(rc, rr, center_coefficient=0.1),
           [-math.log(sig(1.0)) + 0.1 * 1.0, -math.log(sig(-1.0)) + 0.1 * 0.0])


@pytest.mark.parametrize("side", ["right", "left"])
def test_sequence_logps_counts_response_tokens_only(side: str) -> None:
    """Uneven prompts and responses, padded right or left: each row's log-prob is the sum over
    its response targets alone, equal to scoring the row by itself without padding."""
    torch.manual_seed(0)
    vocab, pad = 11, 0
    rows = [([3, 4, 5], [6, 7]), ([8], [9, 10, 2, 3]), ([1, 2, 3, 4, 5], [6])]
    width = max(len(p) + len(r) for p, r in rows)
    table = torch.randn(width + 1, vocab, vocab, dtype=torch.float64)  # logits depend on (position, token)

    def logits_of(ids: torch.Tensor, offsets: list[int]) -> torch.Tensor:
        out = torch.zeros(*ids.shape, vocab, dtype=torch.float64)
        for b in range(ids.shape[0]):
            for i in range(ids.shape[1]):
                out[b, i] = table[max(i - offsets[b], 0), ids[b, i]]
        return out

    ids = torch.full((len(rows), width), pad)
    labels = torch.full((len(rows), width), -100)
    offsets = []
    for b, (prompt, response) in enumerate(rows):
        seq = prompt + response
        start = 0 if side == "right" else width - len(seq)
        offsets.append(start)
        ids[b, start:start + len(seq)] = torch.tensor(seq)
        for j in range(len(prompt), len(seq)):  # labels[t] = token t+1 when t+1 is a response token
            labels[b, start + j - 1] = seq[j]
    logps, counts = sequence_logps(logits_of(ids, offsets), labels)
    assert counts.tolist() == [len(r) for _, r in rows]
    for b, (prompt, response) in enumerate(rows):
        seq = prompt + response
        single = logits_of(torch.tensor([seq]), [0])[0].log_softmax(-1)
        expect = sum(single[j - 1, seq[j]].item() for j in range(len(prompt), len(seq)))
        assert logps[b].item() == pytest.approx(expect, rel=1e-6)


def test_response_logps_runs_the_head_on_responses_only_and_matches_full_logits() -> None:
    """`response_logps` (the LM head at the labelled positions only) equals `sequence_logps` on
    the full logits, values and gradients, with a softcapped head; the head sees N rows, not B·T."""
    from align.objectives import response_logps
    from model.build import build_model
    from model.config import ModelConfig

    torch.manual_seed(0)
    cfg = ModelConfig(family="llama", vocab_size=50, dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
                      ffn_hidden_dim=64, max_seq_len=32, tie_embeddings=False, final_logit_softcap=30.0)
    model = build_model(cfg)
    ids = torch.randint(0, 50, (3, 12))
    labels = torch.full((3, 12), -100)
    labels[0, 4:11] = ids[0, 5:12]
    labels[1, 2:6] = ids[1, 3:7]
    labels[2, 9:11] = ids[2, 10:12]
    rows_seen = []
    hook = model.lm_head.register_forward_hook(lambda m, a, o: rows_seen.append(a[0].shape[0]))
    got, counts = response_logps(model, ids, labels)
    hook.remove()
    assert rows_seen == [13] and counts.tolist() == [7, 4, 2]
    got.sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    want, _ = sequence_logps(model(ids), labels)
    want.sum().backward()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for n, p in model.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)
