"""Fused LM head + cross-entropy (model/linear_ce.py) against the logits path."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import model.linear_ce as linear_ce
from model import build_model, get_preset
from model.linear_ce import IGNORE_INDEX, linear_cross_entropy
from trainer.losses import causal_lm_loss, cross_entropy_sum, mtp_depth_losses, mtp_targets
from trainer_fixtures import one_thread  # noqa: F401 (autouse fixture)


def test_by_hand() -> None:
    # h = [[1, 0], [0, 1]] and W = [[ln 3, 0], [0, 0]]: row 0 has logits (ln 3, 0) → p(0) = 3/4,
    # row 1 (0, 0) → p(1) = 1/2; loss = -ln(3/4) - ln(1/2) = ln(8/3)
    h = torch.eye(2)
    weight = torch.tensor([[math.log(3.0), 0.0], [0.0, 0.0]])
    loss = linear_cross_entropy(h, weight, torch.tensor([0, 1]))
    assert loss.item() == pytest.approx(math.log(8 / 3), abs=1e-6)


@pytest.mark.parametrize("softcap", [None, 2.0])
def test_equals_logits_path_values_and_gradients(softcap, monkeypatch) -> None:
    monkeypatch.setattr(linear_ce, "MIN_CHUNK_ROWS", 7)  # several chunks and a ragged last one
    monkeypatch.setattr(linear_ce, "CHUNK_ELEMENTS", 1)
    torch.manual_seed(0)
    h = torch.randn(3, 10, 16, requires_grad=True)  # (B, T, D)
    weight = (torch.randn(50, 16) * 0.5).requires_grad_()
    targets = torch.randint(0, 50, (3, 10))
    targets[0, :4] = IGNORE_INDEX
    targets[2, 9] = IGNORE_INDEX

    logits = h @ weight.t()
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    ref = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum")
    ref.backward()
    ref_h, ref_w = h.grad.clone(), weight.grad.clone()
    h.grad = weight.grad = None

    loss = linear_cross_entropy(h, weight, targets, softcap=softcap)
    (0.5 * loss).backward()  # the incoming gradient scales both
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    torch.testing.assert_close(h.grad, 0.5 * ref_h, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(weight.grad, 0.5 * ref_w, atol=1e-6, rtol=1e-5)
    assert h.grad[0, :4].abs().max() == 0  # ignored positions get no gradient


def test_frozen_head_and_no_grad() -> None:
    torch.manual_seed(0)
    h = torch.randn(6, 8, requires_grad=True)
    weight = torch.randn(20, 8)  # frozen
    targets = torch.randint(0, 20, (6,))
    ref = F.cross_entropy(h @ weight.t(), targets, reduction="sum")
    (g_ref,) = torch.autograd.grad(ref, h)
    loss = linear_cross_entropy(h, weight, targets)
    (g,) = torch.autograd.grad(loss, h)
    torch.testing.assert_close(g, g_ref, atol=1e-6, rtol=1e-5)
    with torch.no_grad():
        assert linear_cross_entropy(h, weight, targets).item() == pytest.approx(ref.item(), rel=1e-6)


def test_bf16_autocast_close_to_logits_path() -> None:
    torch.manual_seed(0)
    h = torch.randn(32, 16, requires_grad=True)
    weight = torch.randn(40, 16, requires_grad=True)
    targets = torch.randint(0, 40, (32,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = F.cross_entropy(F.linear(h, weight).float(), targets, reduction="sum")
        loss = linear_cross_entropy(h, weight, targets)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(ref.item(), rel=1e-3)
    loss.backward()
    assert h.grad.dtype == torch.float32 and weight.grad.dtype == torch.float32


@pytest.mark.parametrize("preset", ["tiny", "tiny-gemma2"])
def test_causal_lm_loss_equals_the_logits_path(preset) -> None:
    """The trainer's loss (fused, MTP depths included) equals cross-entropy of the model's logits, with the same gradients."""
    cfg = get_preset(preset, mtp_depth=1, mtp_loss_weight=0.3) if preset == "tiny" else get_preset(preset)
    torch.manual_seed(0)
    model = build_model(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (2, 17))
    batch = {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:].clone()}
    batch["labels"][0, :5] = IGNORE_INDEX

    out = causal_lm_loss(model, batch)
    total = out.loss_sum + sum(out.terms.values())
    grads = torch.autograd.grad(total, list(model.parameters()), allow_unused=True)

    ce, n = cross_entropy_sum(model(batch["input_ids"]), batch["labels"])
    ref_total = ce
    if cfg.mtp_depth:
        hidden = model.forward_hidden(batch["input_ids"])
        for k, (ce_k, n_k) in enumerate(mtp_depth_losses(model.mtp_logits(hidden, batch["input_ids"]),
                                                         batch["labels"]), start=1):
            assert out.terms[f"mtp/{k}"].item() == pytest.approx(0.3 * ce_k.item(), rel=1e-5)
            assert out.term_counts[f"mtp/{k}"] == n_k == int((mtp_targets(batch["labels"], None, k) != -100).sum())
            ref_total = ref_total + 0.3 * ce_k
    ref_grads = torch.autograd.grad(ref_total, list(model.parameters()), allow_unused=True)
    assert out.n_tokens == n == 2 * 16 - 5
    assert out.loss_sum.item() == pytest.approx(ce.item(), rel=1e-6)
    for g, r in zip(grads, ref_grads):
        if r is None:
            assert g is None or g.abs().max() == 0
        else:
            torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-4)
