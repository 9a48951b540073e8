"""Loss functions and the normalisation by the global target count (trainer/losses.py)."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from model import build_model
from trainer.losses import (
    IGNORE_INDEX,
    LossOutput,
    causal_lm_loss,
    count_targets,
    cross_entropy_sum,
    micro_batch_objective,
    mtp_loss_sum,
)
from trainer_fixtures import ListLoader, make_trainer, tiny_config, one_thread  # noqa: F401 (autouse fixture)


def test_cross_entropy_sum_by_hand() -> None:
    # row 0: uniform over 2 → ln 2; row 1: p(target=1) = 1/(3+1) → ln 4; row 2 ignored
    logits = torch.tensor([[[0.0, 0.0], [math.log(3.0), 0.0], [5.0, -5.0]]])  # (1, 3, 2)
    targets = torch.tensor([[0, 1, IGNORE_INDEX]])
    loss_sum, n = cross_entropy_sum(logits, targets)
    assert n == 2
    assert loss_sum.item() == pytest.approx(math.log(8.0), abs=1e-6)


def test_count_targets_and_objective_by_hand() -> None:
    batch = {"labels": torch.tensor([[1, IGNORE_INDEX, 2], [IGNORE_INDEX, IGNORE_INDEX, 3]])}
    assert count_targets(batch) == 3
    out = LossOutput(loss_sum=torch.tensor(6.0), n_tokens=2, aux_loss=torch.tensor(0.5))
    # 6 * world 2 / global 3 + aux 0.5 / accum 2
    assert micro_batch_objective(out, global_tokens=3, world_size=2, grad_accum=2).item() == pytest.approx(4.25)
    no_aux = LossOutput(loss_sum=torch.tensor(6.0), n_tokens=2)
    assert micro_batch_objective(no_aux, global_tokens=4, world_size=1, grad_accum=1).item() == pytest.approx(1.5)


def test_mtp_loss_sum_aligns_depths_with_shifted_labels() -> None:
    labels = torch.tensor([[5, 6, 7, 8]])
    # depth 1 predicts labels[:, 1:] = [6, 7, 8]; put all mass on those → zero loss
    good = F.one_hot(torch.tensor([[6, 7, 8]]), 10).float() * 100
    weighted, logged = mtp_loss_sum([good], labels, weight=0.3)
    assert logged.item() == pytest.approx(0.0, abs=1e-6)
    uniform = torch.zeros(1, 3, 10)  # CE = ln 10 on each of 3 targets
    weighted, logged = mtp_loss_sum([uniform], labels, weight=0.3)
    assert logged.item() == pytest.approx(3 * math.log(10), abs=1e-5)
    assert weighted.item() == pytest.approx(0.9 * math.log(10), abs=1e-5)


def test_causal_lm_loss_matches_mean_cross_entropy() -> None:
    cfg = tiny_config(Path("."), Path(".")).model
    torch.manual_seed(0)
    model = build_model(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (2, 9))
    batch = {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:].clone()}
    batch["labels"][1, :5] = IGNORE_INDEX
    out = causal_lm_loss(model, batch)
    ref = F.cross_entropy(model(batch["input_ids"]).flatten(0, 1), batch["labels"].flatten(), ignore_index=IGNORE_INDEX)
    assert out.n_tokens == 11
    assert (out.loss_sum / out.n_tokens).item() == pytest.approx(ref.item(), rel=1e-6)


def test_causal_lm_loss_adds_weighted_mtp_term() -> None:
    cfg = tiny_config(Path("."), Path("."), model={"mtp_depth": 2, "mtp_loss_weight": 0.5}).model
    torch.manual_seed(0)
    model = build_model(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (2, 9))
    batch = {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:]}
    out = causal_lm_loss(model, batch)
    hidden = model.forward_hidden(batch["input_ids"])
    depth_sums = [cross_entropy_sum(lg, batch["labels"][:, k:])[0] for k, lg in
                  enumerate(model.mtp_logits(hidden, batch["input_ids"]), start=1)]
    expected = out.sums["ce"] + 0.5 * torch.stack(depth_sums).mean()
    assert out.loss_sum.item() == pytest.approx(expected.item(), rel=1e-6)
    out.loss_sum.backward()
    assert model.mtp[1].proj.weight.grad is not None  # the MTP modules train


def _sgd(model: torch.nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.SGD([{"params": params, "lr": 1.0, "base_lr": 1.0}])


def _masked_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(4, 64, (4, 9), generator=g)
    labels = tokens[:, 1:].clone()
    labels[1, 2:] = IGNORE_INDEX   # 2 targets
    labels[2, :3] = IGNORE_INDEX   # 5 targets
    labels[3, :] = IGNORE_INDEX    # 0 targets; row 0 keeps all 8
    return {"input_ids": tokens[:, :-1], "labels": labels}


@pytest.mark.parametrize("accum", [1, 2, 4])
def test_grad_accumulation_equals_mean_over_all_targets(tmp_path: Path, accum: int) -> None:
    """accum micro-batches of B/accum rows (uneven masks) = one batch of B: the update is the
    gradient of the mean CE over all 15 targets, not a mean of per-micro-batch means."""
    batch = _masked_batch()
    cfg = tiny_config(tmp_path, tmp_path / "runs", training={
        "grad_accum_steps": accum, "batch_size": 4 // accum, "lr_schedule": "constant", "warmup_steps": 0,
        "grad_clip": 0.0, "spike_guard": False})
    torch.manual_seed(0)
    ref_model = build_model(cfg.model)
    ref_loss = F.cross_entropy(ref_model(batch["input_ids"]).flatten(0, 1), batch["labels"].flatten(),
                               ignore_index=IGNORE_INDEX)
    ref_loss.backward()
    expected = {n: (p - p.grad).detach() for n, p in ref_model.named_parameters()}  # SGD, lr 1

    torch.manual_seed(0)
    model = build_model(cfg.model)
    rows = 4 // accum
    micro = [{k: v[i * rows:(i + 1) * rows] for k, v in batch.items()} for i in range(accum)]
    trainer = make_trainer(cfg, model, ListLoader(micro), tmp_path, optimizer_factory=_sgd)
    stats = trainer.train_step()
    assert stats["loss"] == pytest.approx(ref_loss.item(), rel=1e-6)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), expected[name], rtol=1e-5, atol=1e-6, msg=name)
