"""The pure online-RL math (`align/rl_losses.py`) on numbers worked out by hand: KL estimators,
GRPO group advantages under each reward scaling, the clipped surrogate at ε / ε_high with both
signs of advantage, GSPO's sequence ratio, the loss normalisers, and the PPO path (per-token
rewards → GAE → clipped value loss) on 5-token examples with padding that carries garbage."""
from __future__ import annotations

import math

import pytest
import torch

from align.rl_losses import (aggregate_loss, gae, group_advantages, group_std, gspo_log_ratio, kl_k1, kl_k3,
                             loss_count, policy_loss, ppo_token_rewards, token_entropy, value_loss, whiten,
                             zero_variance_groups)


def t(*values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def approx(value: torch.Tensor, expected, rel: float = 1e-9, abs_: float = 1e-12) -> None:
    """value equals the (possibly nested) list expected, shape included."""
    want = torch.tensor(expected, dtype=torch.float64)
    assert tuple(value.shape) == tuple(want.shape), f"shape {tuple(value.shape)} != {tuple(want.shape)}"
    assert value.flatten().tolist() == pytest.approx(want.flatten().tolist(), rel=rel, abs=abs_)


# ------------------------------------------------------------------------------------------------ KL
def test_kl_estimators_by_hand() -> None:
    # π = 0.5, π_ref = 0.25 | equal | π = 0.25, π_ref = 0.5
    logps = t(math.log(0.5), -1.0, math.log(0.25))
    ref = t(math.log(0.25), -1.0, math.log(0.5))
    approx(kl_k1(logps, ref), [math.log(2), 0.0, -math.log(2)])
    # k3 = π_ref/π - log(π_ref/π) - 1: 0.5 + log 2 - 1 | 0 | 2 - log 2 - 1
    approx(kl_k3(logps, ref), [math.log(2) - 0.5, 0.0, 1 - math.log(2)])


# ------------------------------------------------------------------------------- group advantages
# two groups of three: group 0 = 1, 2, 3 (mean 2, unbiased std 1); group 1 = 0, 0, 3 (mean 1,
# deviations -1, -1, 2, unbiased var (1 + 1 + 4) / 2 = 3); the whole batch (mean 1.5): deviations
# -.5, .5, 1.5, -1.5, -1.5, 1.5, unbiased var 9.5 / 5 = 1.9
REWARDS = t(1.0, 2.0, 3.0, 0.0, 0.0, 3.0)
CENTRED = [-1.0, 0.0, 1.0, -1.0, -1.0, 2.0]  # minus the group mean (not the batch mean), in every mode
E = 1e-4


def test_group_advantages_group_scaling() -> None:
    approx(group_advantages(REWARDS, 3, "group"),
           [-1 / (1 + E), 0.0, 1 / (1 + E), -1 / (math.sqrt(3) + E), -1 / (math.sqrt(3) + E), 2 / (math.sqrt(3) + E)])
    approx(group_std(REWARDS, 3), [1.0, 1.0, 1.0, math.sqrt(3), math.sqrt(3), math.sqrt(3)])


def test_group_advantages_batch_scaling() -> None:
    approx(group_advantages(REWARDS, 3, "batch"), [c / (math.sqrt(1.9) + E) for c in CENTRED])
    # a std computed elsewhere (across processes) replaces the local one
    approx(group_advantages(REWARDS, 3, "batch", batch_std=torch.tensor(2.0, dtype=torch.float64)),
           [c / (2 + E) for c in CENTRED])


def test_group_advantages_no_scaling_dr_grpo() -> None:
    approx(group_advantages(REWARDS, 3, "none"), CENTRED)
    approx(group_advantages(REWARDS, 2, "none"), [-0.5, 0.5, 1.5, -1.5, -1.5, 1.5])  # groups (1,2) (3,0) (0,3)
    with pytest.raises(ValueError):
        group_advantages(REWARDS, 3, "mean")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        group_advantages(REWARDS, 4, "group")  # 6 rewards are not groups of 4


def test_zero_variance_groups_and_nan_rewards() -> None:
    rewards = t(1.0, 1.0, 1.0, 0.0, 1.0, 0.0)
    assert zero_variance_groups(rewards, 3).tolist() == [True, False]
    approx(group_advantages(rewards, 3, "group")[:3], [0.0, 0.0, 0.0])
    # an unscorable completion (NaN) is left out of its group's mean and std and gets advantage 0:
    # group 1, NaN, 3 → mean 2, std √2
    adv = group_advantages(t(1.0, float("nan"), 3.0, 0.0, 1.0, 2.0), 3, "group")
    approx(adv, [-1 / (math.sqrt(2) + E), 0.0, 1 / (math.sqrt(2) + E), -1 / (1 + E), 0.0, 1 / (1 + E)])
    # one sample per prompt: std 0 by convention, so advantage 0 (not NaN)
    approx(group_advantages(t(1.0, 5.0), 1, "group"), [0.0, 0.0])
    assert zero_variance_groups(t(1.0, 5.0), 1).tolist() == [True, True]


# ----------------------------------------------------------------------------------- policy loss
# ratios 0.7, 0.9, 1.25, 1.4 for a positive (A = 2) and a negative (A = -1) advantage, ε = 0.2, ε_high = 0.3
RATIOS = [0.7, 0.9, 1.25, 1.4]


def _ratio_batch():
    old = t(*[-1.0] * 4).repeat(2, 1)
    logps = (old + t(*[math.log(r) for r in RATIOS])).requires_grad_()
    return logps, old, t(2.0, -1.0), torch.ones(2, 4, dtype=torch.bool)


def test_policy_loss_clipping_with_epsilon_high() -> None:
    logps, old, adv, mask = _ratio_batch()
    out = policy_loss(logps, old, adv, mask, epsilon=0.2, epsilon_high=0.3)
    # A > 0: -A·min(ρ, clip(ρ, 0.8, 1.3)) = -2·(0.7, 0.9, 1.25, 1.3)
    # A < 0: -A·max(ρ, clip(ρ)) (the pessimistic side) = (0.8, 0.9, 1.25, 1.4)
    approx(out.per_token, [[-1.4, -1.8, -2.5, -2.6], [0.8, 0.9, 1.25, 1.4]])
    assert out.clip_high.tolist() == [[False, False, False, True], [False] * 4]
    assert out.clip_low.tolist() == [[False] * 4, [True, False, False, False]]
    approx(out.ratio, [RATIOS, RATIOS])
    assert out.kl is None
    # where the clip is active the token gets no gradient; elsewhere d/dlogp (-ρA) = -ρA
    out.per_token.sum().backward()
    approx(logps.grad, [[-1.4, -1.8, -2.5, 0.0], [0.0, 0.9, 1.25, 1.4]])


def test_policy_loss_symmetric_epsilon() -> None:
    logps, old, adv, mask = _ratio_batch()
    out = policy_loss(logps, old, adv, mask, epsilon=0.2)  # ε_high defaults to ε: 1.25 is clipped to 1.2 now
    approx(out.per_token, [[-1.4, -1.8, -2.4, -2.4], [0.8, 0.9, 1.25, 1.4]])
    assert out.clip_high.tolist() == [[False, False, True, True], [False] * 4]


def test_policy_loss_kl_term_and_padding() -> None:
    logps, old, adv, _ = _ratio_batch()
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    ref = logps.detach() + math.log(2)  # π_ref / π = 2 everywhere: k3 = 2 - log 2 - 1
    k3 = 1 - math.log(2)
    out = policy_loss(logps, old, adv, mask, epsilon=0.2, epsilon_high=0.3, ref_logps=ref, beta=0.1)
    approx(out.per_token, [[-1.4 + 0.1 * k3, -1.8 + 0.1 * k3, -2.5 + 0.1 * k3, 0.0],
                           [0.8 + 0.1 * k3, 0.9 + 0.1 * k3, 0.0, 0.0]])
    approx(out.kl, [[k3, k3, k3, 0.0], [k3, k3, 0.0, 0.0]])
    assert not out.clip_high.any()  # the only high-clipped token (ρ = 1.4, A > 0) is padding here
    # β = 0 with a reference: the KL is reported but not in the loss
    no_beta = policy_loss(logps, old, adv, mask, epsilon=0.2, epsilon_high=0.3, ref_logps=ref)
    approx(no_beta.per_token, [[-1.4, -1.8, -2.5, 0.0], [0.8, 0.9, 0.0, 0.0]])
    approx(no_beta.kl, out.kl.tolist())
    with pytest.raises(ValueError):
        policy_loss(logps, old, adv, mask, epsilon=0.2, beta=0.1)


def test_policy_loss_kl_importance_correction() -> None:
    """TRL 1.16's default use_bias_correction_kl: the KL term is ρ·k3, ρ carrying its gradient."""
    logps, old, adv, mask = _ratio_batch()
    ref = logps.detach() + math.log(2)
    k3 = 1 - math.log(2)
    out = policy_loss(logps, old, adv, mask, epsilon=0.2, epsilon_high=0.3, ref_logps=ref, beta=0.1,
                      kl_importance_correction=True)
    approx(out.kl, [[r * k3 for r in RATIOS]] * 2)
    approx(out.per_token, [[-1.4 + 0.07 * k3, -1.8 + 0.09 * k3, -2.5 + 0.125 * k3, -2.6 + 0.14 * k3],
                           [0.8 + 0.07 * k3, 0.9 + 0.09 * k3, 1.25 + 0.125 * k3, 1.4 + 0.14 * k3]])
    # d/dlogp of 0.1·ρ·(e^r - r - 1), r = ref - logp: 0.1·ρ·(k3 + 1 - e^r) = 0.1·ρ·(k3 - 1) here (e^r = 2);
    # take the clipped tokens (ρ = 1.4, A > 0 and ρ = 0.7, A < 0), where the surrogate has no gradient
    out.per_token.sum().backward()
    approx(logps.grad[0, 3], 0.1 * 1.4 * (k3 - 1))
    approx(logps.grad[1, 0], 0.1 * 0.7 * (k3 - 1))


def test_gspo_sequence_ratio_by_hand() -> None:
    old = torch.zeros(3, 4, dtype=torch.float64)
    logps = t(0.3, -0.1, 0.4, 9.0).repeat(3, 1)  # 9.0 is padding in row 0
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [0, 0, 0, 0]])
    # row 0: (0.3 - 0.1 + 0.4) / 3 = 0.2; row 1: 9.6 / 4 = 2.4; row 2: no tokens → 0
    approx(gspo_log_ratio(logps, old, mask), [[0.2], [2.4], [0.0]])
    out = policy_loss(logps, old, t(1.0, -1.0, 1.0), mask, epsilon=0.2, level="sequence")
    # row 0: ρ = e^0.2 = 1.2214 > 1.2 with A > 0 → clipped: -1.2 on each token; row 1: A < 0, ρ = e^2.4,
    # the pessimistic side keeps ρ: +e^2.4 on each token; row 2: ρ = 1 → -1 (but it has no tokens: 0)
    e24 = math.exp(2.4)
    approx(out.per_token, [[-1.2, -1.2, -1.2, 0.0], [e24] * 4, [0.0] * 4])
    assert out.clip_high.tolist() == [[True, True, True, False], [False] * 4, [False] * 4]
    approx(out.ratio, [[math.exp(0.2)] * 3 + [0.0], [e24] * 4, [0.0] * 4])


# ----------------------------------------------------------------------------------- aggregation
def test_aggregate_loss_normalisers() -> None:
    per_token = t(1.0, 2.0, 3.0).repeat(3, 1) + t(0.0, 3.0, 6.0)[:, None]  # rows 1 2 3 / 4 5 6 / 7 8 9
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0]])
    s, n = aggregate_loss(per_token, mask, "token_mean", max_completion_length=4)
    assert (s.item(), n) == (1 + 2 + 4, 3.0)
    s, n = aggregate_loss(per_token, mask, "sequence_mean", max_completion_length=4)
    assert (s.item(), n) == (pytest.approx(3 / 2 + 4 / 1 + 0), 3.0)  # an empty row counts, with loss 0
    s, n = aggregate_loss(per_token, mask, "dr_grpo", max_completion_length=4)
    assert (s.item(), n) == (7.0, 12.0)
    assert [loss_count(mask, h, 4) for h in ("token_mean", "sequence_mean", "dr_grpo")] == [3.0, 3.0, 12.0]
    with pytest.raises(ValueError):
        aggregate_loss(per_token, mask, "mean", 4)  # type: ignore[arg-type]


def test_token_mean_over_micro_batches_is_the_whole_batch_mean() -> None:
    g = torch.Generator().manual_seed(0)
    per_token = torch.randn(4, 5, generator=g, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 0, 0, 0, 0], [1, 0, 0, 0, 0]])
    parts = [aggregate_loss(per_token[i:i + 2], mask[i:i + 2], "token_mean", 5) for i in (0, 2)]
    combined = sum(p[0] for p in parts) / sum(p[1] for p in parts)
    approx(combined, per_token[mask.bool()].mean().item())
    # the mean of the micro-batch means (TRL's bnpo with accumulation) is a different number here
    assert abs((parts[0][0] / parts[0][1] + parts[1][0] / parts[1][1]).item() / 2 - combined.item()) > 1e-3


# ---------------------------------------------------------------------------------- GAE and whiten
def test_gae_by_hand() -> None:
    gamma, lam = 0.9, 0.5  # γλ = 0.45
    rewards = t(0.1, 0.0, -0.2, 0.0, 1.0).repeat(2, 1)
    rewards[1] = t(0.0, 0.5, 2.0, 5.0, 5.0)  # row 1: 3 tokens, then padding with garbage
    values = torch.stack([t(0.5, 0.4, 0.3, 0.2, 0.6), t(1.0, 1.0, 1.0, 9.0, 9.0)])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    adv, ret = gae(rewards, values, mask, gamma, lam)
    # row 0: δ4 = 1 - 0.6 = 0.4; δ3 = 0.9·0.6 - 0.2 = 0.34; δ2 = -0.2 + 0.9·0.2 - 0.3 = -0.32;
    #        δ1 = 0.9·0.3 - 0.4 = -0.13; δ0 = 0.1 + 0.9·0.4 - 0.5 = -0.04
    #        A4 = 0.4; A3 = 0.34 + 0.45·0.4 = 0.52; A2 = -0.32 + 0.45·0.52 = -0.086;
    #        A1 = -0.13 + 0.45·(-0.086) = -0.1687; A0 = -0.04 + 0.45·(-0.1687) = -0.115915
    # row 1: V after the last token is 0 (not the 9.0 of padding): δ2 = 2 - 1 = 1; δ1 = 0.5 + 0.9 - 1 = 0.4;
    #        δ0 = 0.9 - 1 = -0.1; A2 = 1; A1 = 0.4 + 0.45 = 0.85; A0 = -0.1 + 0.45·0.85 = 0.2825
    approx(adv, [[-0.115915, -0.1687, -0.086, 0.52, 0.4], [0.2825, 0.85, 1.0, 0.0, 0.0]], rel=1e-9, abs_=1e-12)
    approx(ret, [[0.384085, 0.2313, 0.214, 0.72, 1.0], [1.2825, 1.85, 2.0, 0.0, 0.0]], rel=1e-9, abs_=1e-12)


def test_gae_gamma_lambda_one_is_reward_to_go_minus_value() -> None:
    rewards = torch.stack([t(0.1, 0.0, -0.2, 0.0, 1.0)])
    values = torch.stack([t(0.5, 0.4, 0.3, 0.2, 0.6)])
    adv, ret = gae(rewards, values, torch.ones(1, 5), gamma=1.0, lam=1.0)
    approx(ret, [[0.9, 0.8, 0.8, 1.0, 1.0]])  # suffix sums of the rewards (Monte Carlo returns)
    approx(adv, [[0.4, 0.4, 0.5, 0.8, 0.4]])
    # λ = 0 is the one-step TD error
    adv0, _ = gae(rewards, values, torch.ones(1, 5), gamma=1.0, lam=0.0)
    approx(adv0, [[0.1 + 0.4 - 0.5, 0.3 - 0.4, -0.2 + 0.2 - 0.3, 0.6 - 0.2, 1.0 - 0.6]])


def test_ppo_rewards_gae_value_loss_path_by_hand() -> None:
    """Scores → per-token rewards → GAE (γ = 1, λ = 0.5) → clipped value loss (c = 0.2), 2 rows of
    5 tokens, row 1 has 3 tokens and garbage on its padding."""
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    kl = torch.stack([t(0.2, -0.1, 0.0, 0.3, 0.1), t(0.5, 0.0, -0.2, 7.0, 7.0)])
    rewards = ppo_token_rewards(t(1.0, -0.5), kl, mask, kl_coef=0.1)
    # -0.1·kl, the score on the last real token: row 0 -0.01 + 1 = 0.99, row 1 0.02 - 0.5 = -0.48
    approx(rewards, [[-0.02, 0.01, 0.0, -0.03, 0.99], [-0.05, 0.0, -0.48, 0.0, 0.0]])

    old_values = torch.stack([t(0.5, 0.5, 0.5, 0.5, 0.5), t(0.2, 0.0, -0.4, 3.0, 3.0)])
    adv, ret = gae(rewards, old_values, mask, gamma=1.0, lam=0.5)
    # row 0: δ = (-0.02, 0.01, 0, -0.03, 0.49) → A4 = 0.49, A3 = -0.03 + 0.245 = 0.215, A2 = 0.1075,
    #        A1 = 0.01 + 0.05375 = 0.06375, A0 = -0.02 + 0.031875 = 0.011875; R = A + 0.5
    # row 1: δ2 = -0.48 + 0.4 = -0.08, δ1 = 0 - 0.4 - 0 = -0.4, δ0 = -0.05 + 0 - 0.2 = -0.25
    #        A2 = -0.08, A1 = -0.4 - 0.04 = -0.44, A0 = -0.25 - 0.22 = -0.47; R = A + V = -0.27, -0.44, -0.48
    approx(adv, [[0.011875, 0.06375, 0.1075, 0.215, 0.49], [-0.47, -0.44, -0.08, 0.0, 0.0]], abs_=1e-12)
    approx(ret, [[0.511875, 0.56375, 0.6075, 0.715, 0.99], [-0.27, -0.44, -0.48, 0.0, 0.0]], abs_=1e-12)

    values = torch.stack([t(0.8, 0.5, 0.6, 0.4, 0.9), t(-0.2, -0.5, -0.4, 5.0, 5.0)])
    loss, clipped = value_loss(values, old_values, ret, mask, clip_range=0.2)
    # row 0: v 0.8 → clip 0.7: (0.288125², 0.188125²) → max unclipped; v 0.5 = old: 0.06375²;
    #        0.6: 0.0075²; 0.4: 0.315²; v 0.9 → clip 0.7: (0.09², 0.29²) → clipped wins
    # row 1: v -0.2 → clip 0.0: (0.07², 0.27²) clipped; v -0.5 → clip -0.2: (0.06², 0.24²) clipped;
    #        v -0.4 = old: 0.08²
    approx(loss, [[0.5 * 0.288125 ** 2, 0.5 * 0.06375 ** 2, 0.5 * 0.0075 ** 2, 0.5 * 0.315 ** 2, 0.5 * 0.29 ** 2],
                  [0.5 * 0.27 ** 2, 0.5 * 0.24 ** 2, 0.5 * 0.08 ** 2, 0.0, 0.0]], abs_=1e-12)
    assert clipped.tolist() == [[False, False, False, False, True], [True, True, False, False, False]]


def test_ppo_token_rewards_any_padding_side_and_empty_rows() -> None:
    mask = torch.tensor([[0, 1, 1, 0], [0, 0, 0, 0]])
    rewards = ppo_token_rewards(t(2.0, 3.0), torch.zeros(2, 4, dtype=torch.float64), mask, kl_coef=0.5)
    approx(rewards, [[0.0, 0.0, 2.0, 0.0], [0.0] * 4])  # a row without tokens gets no score


def test_whiten_by_hand() -> None:
    x = torch.stack([t(2.0, 4.0, 100.0), t(6.0, -50.0, 7.0)])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    # masked entries 2, 4, 6: mean 4, unbiased var (4 + 0 + 4) / 2 = 4 → std 2 (+1e-8 in the root)
    s = 1 / math.sqrt(4 + 1e-8)
    approx(whiten(x, mask), [[-2 * s, 0.0, 0.0], [2 * s, 0.0, 0.0]])
    approx(whiten(x, mask, shift_mean=False), [[-2 * s + 4, 4.0, 0.0], [2 * s + 4, 0.0, 0.0]])


# ------------------------------------------------------------------------------------------ entropy
def test_token_entropy_by_hand() -> None:
    logits = torch.zeros(3, 2, 4, dtype=torch.float64)
    logits[1, 0] = t(0.0, math.log(3), -1e9, -1e9)  # p = 1/4, 3/4
    logits[2, 1] = t(1e4, 1e4 + math.log(3), 1e4 - 1e9, 1e4 - 1e9)  # same, shifted: stable
    h2 = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    expect = [[math.log(4)] * 2, [h2, math.log(4)], [math.log(4), h2]]
    approx(token_entropy(logits, chunk_size=2), expect)
    assert token_entropy(logits.to(torch.bfloat16)).dtype == torch.float32
