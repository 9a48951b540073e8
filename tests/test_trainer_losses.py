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
    mtp_depth_losses,
    mtp_targets,
    term_counts,
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


def test_mtp_depths_align_with_shifted_labels() -> None:
    labels = torch.tensor([[5, 6, 7, 8]])
    # depth 1 predicts labels[:, 1:] = [6, 7, 8]; put all mass on those → zero loss
    good = F.one_hot(torch.tensor([[6, 7, 8]]), 10).float() * 100
    [(ce, n)] = mtp_depth_losses([good], labels)
    assert ce.item() == pytest.approx(0.0, abs=1e-6) and n == 3
    uniform = [torch.zeros(1, 3, 10), torch.zeros(1, 2, 10)]  # CE = ln 10 on each target
    [(ce1, n1), (ce2, n2)] = mtp_depth_losses(uniform, labels)
    assert (n1, n2) == (3, 2)  # depth k has T - k targets
    assert ce1.item() == pytest.approx(3 * math.log(10), abs=1e-5)
    assert ce2.item() == pytest.approx(2 * math.log(10), abs=1e-5)


def test_mtp_targets_never_cross_a_document_boundary() -> None:
    """Issue 14, defect 11. One packed row of documents [a0 a1 a2 | b0 b1 | c0 c1 c2]: the
    depth-k target of position i is labels[i + k], kept only when position i + k is in i's
    document."""
    doc_ids = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2]])
    labels = torch.tensor([[11, 12, 13, 14, 15, 16, 17, 18]])  # labels[j] = the token after position j
    x = IGNORE_INDEX
    assert mtp_targets(labels, doc_ids, 1).tolist() == [[12, 13, x, 15, x, 17, 18]]
    assert mtp_targets(labels, doc_ids, 2).tolist() == [[13, x, x, x, x, 18]]
    assert mtp_targets(labels, None, 2).tolist() == [[13, 14, 15, 16, 17, 18]]  # no doc_ids: one stream
    masked = labels.clone()
    masked[0, 6] = x  # a target the main loss ignores stays ignored
    assert mtp_targets(masked, doc_ids, 1).tolist() == [[12, 13, x, 15, x, x, 18]]


def test_mtp_loss_by_hand_in_a_packed_row() -> None:
    """DeepSeek-V3 eq. 25 with each depth normalised by its own targets (issue 14, defect 11):
    objective = CE_main / N_main + λ / D · Σ_k CE_k / N_k, by hand from the model's logits."""
    cfg = tiny_config(Path("."), Path("."), model={"mtp_depth": 2, "mtp_loss_weight": 0.5}).model
    torch.manual_seed(0)
    model = build_model(cfg)
    tokens = torch.randint(4, cfg.vocab_size, (2, 9))
    doc_ids = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0, 1, 1]])
    position_ids = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4], [0, 1, 2, 3, 4, 5, 0, 1]])
    batch = {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:], "doc_ids": doc_ids, "position_ids": position_ids}
    out = causal_lm_loss(model, batch)

    hidden = model.forward_hidden(batch["input_ids"], positions=position_ids, doc_ids=doc_ids)
    mtp = model.mtp_logits(hidden, batch["input_ids"], positions=position_ids, doc_ids=doc_ids)
    by_hand = []
    for k, logits in enumerate(mtp, start=1):  # keep position i when i and i + k share a document
        keep = [(r, i) for r in range(2) for i in range(8 - k) if doc_ids[r, i] == doc_ids[r, i + k]]
        ce = sum(F.cross_entropy(logits[r, i], batch["labels"][r, i + k]) for r, i in keep)
        by_hand.append((ce, len(keep)))
    assert [n for _, n in by_hand] == [12, 8]  # depth 1: 14 positions, 2 cross; depth 2: 12, 4 cross
    assert term_counts(model, batch) == out.term_counts == {"mtp/1": 12, "mtp/2": 8}
    for k, (ce, _) in enumerate(by_hand, start=1):
        assert out.sums[f"mtp/{k}"].item() == pytest.approx(ce.item(), rel=1e-5)

    objective = micro_batch_objective(out, 16, world_size=1, grad_accum=1, global_counts=out.term_counts)
    expected = out.sums["ce"] / 16 + 0.5 / 2 * sum(ce / n for ce, n in by_hand)
    assert objective.item() == pytest.approx(expected.item(), rel=1e-5)
    with pytest.raises(RuntimeError, match="no step count"):
        micro_batch_objective(out, 16, world_size=1, grad_accum=1)


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


def test_causal_lm_loss_adds_weighted_mtp_terms() -> None:
    cfg = tiny_config(Path("."), Path("."), model={"mtp_depth": 2, "mtp_loss_weight": 0.5}).model
    torch.manual_seed(0)
    model = build_model(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (2, 9))
    batch = {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:]}
    out = causal_lm_loss(model, batch)
    hidden = model.forward_hidden(batch["input_ids"])
    depths = mtp_depth_losses(model.mtp_logits(hidden, batch["input_ids"]), batch["labels"])
    assert out.loss_sum.item() == pytest.approx(out.sums["ce"].item(), rel=1e-6)  # the main loss alone
    for k, (ce, n) in enumerate(depths, start=1):
        assert out.terms[f"mtp/{k}"].item() == pytest.approx(0.25 * ce.item(), rel=1e-6)
        assert out.term_counts[f"mtp/{k}"] == n == 2 * (8 - k)
    out.terms["mtp/2"].backward()
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


@pytest.mark.parametrize("accum", [1, 2])
def test_mtp_depths_are_normalised_over_the_whole_step(tmp_path: Path, accum: int) -> None:
    """Micro-batches whose rows hold different numbers of documents (so different depth-k
    target counts) accumulate to one batch's objective: each MTP depth is a mean over all
    its targets of the step, counted before the forward and all-reduced like the main count."""
    from data_pipeline.loader import document_ids_and_positions

    cfg = tiny_config(tmp_path, tmp_path / "runs", model={"mtp_depth": 2, "mtp_loss_weight": 0.5}, training={
        "grad_accum_steps": accum, "batch_size": 4 // accum, "lr_schedule": "constant", "warmup_steps": 0,
        "grad_clip": 0.0, "spike_guard": False})
    batch = _masked_batch()
    batch["input_ids"][0, [2, 5]] = 0  # EOS: row 0 holds three documents, row 1 two, the others one
    batch["input_ids"][1, 3] = 0
    batch.update(document_ids_and_positions(batch["input_ids"], eos_id=0))
    torch.manual_seed(0)
    ref_model = build_model(cfg.model)
    out = causal_lm_loss(ref_model, batch)
    counts = term_counts(ref_model, batch)
    ref_loss = micro_batch_objective(out, count_targets(batch), 1, 1, global_counts=counts)
    ref_loss.backward()
    expected = {n: (p - p.grad).detach() for n, p in ref_model.named_parameters()}  # SGD, lr 1

    torch.manual_seed(0)
    model = build_model(cfg.model)
    rows = 4 // accum
    micro = [{k: v[i * rows:(i + 1) * rows] for k, v in batch.items()} for i in range(accum)]
    if accum > 1:  # uneven: a mean of per-micro-batch means would weigh them wrongly
        assert [term_counts(model, m) for m in micro] == [{"mtp/1": 6, "mtp/2": 2}, {"mtp/1": 5, "mtp/2": 5}]
    trainer = make_trainer(cfg, model, ListLoader(micro), tmp_path, optimizer_factory=_sgd)
    stats = trainer.train_step()
    assert stats["loss"] == pytest.approx(ref_loss.item(), rel=1e-6)
    assert stats["sums"]["mtp/1"] == pytest.approx(out.sums["mtp/1"].item() / counts["mtp/1"], rel=1e-6)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), expected[name], rtol=1e-5, atol=1e-6, msg=name)
