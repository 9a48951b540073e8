"""Our GRPO math (`align/rl_losses.py`) equals TRL's own ``GRPOTrainer`` (trl 1.16).

A real ``trl.GRPOTrainer`` is built per case from a ``GRPOConfig`` (CPU, fp32) around a tiny
random ``transformers`` Llama saved to a temporary folder (TRL loads its reference model from
that path when β > 0) and an offline word-level tokenizer. Nothing is downloaded.

* Loss (`test_loss_matches_trl`): TRL's ``_compute_loss(model, inputs)`` runs on a hand-made
  batch (8 completions in 2 groups of 4, uneven lengths, one empty row, finite garbage on
  padding), with the trainer's ``_get_per_token_logps_and_entropies`` patched to return our
  chosen log-probs, so both sides see identical numbers. Its loss must equal ``loss_sum /
  normaliser`` of ``aggregate_loss(policy_loss(...).per_token)`` (grpo → sequence_mean,
  bnpo and dapo → token_mean, dr_grpo → dr_grpo), and its gradient w.r.t. the log-probs ours,
  to 1e-6, for every loss type × KL term (β = 0; β = 0.04 with plain k3; β = 0.04 with ρ·k3,
  which is TRL's default ``use_bias_correction_kl=True`` and our ``kl_importance_correction``)
  × ε_high ∈ {ε, 0.28} × token / sequence (GSPO) importance sampling. TRL's logged ``kl`` and
  ``clip_ratio/{low,high,region}_mean`` must be our masked means of ``kl``, ``clip_low``,
  ``clip_high`` (per sequence at sequence level, as TRL). The batch is built so that every
  branch is live (`test_batch_exercises_every_clip_branch`), and a 10% wrong β, the other KL
  form or a dropped ε_high moves the loss far beyond the tolerance.
* Gradient accumulation (`test_accumulation_matches_trl`): with 2 accumulation steps, TRL
  scales each micro-batch (grpo, dr_grpo) or divides by the generation batch's token count
  (dapo); the sum of its micro-batch losses must be our Σ loss_sum / Σ normaliser (bnpo: the
  mean of the micro-batch token means, which is not the whole batch's token mean).
* Advantages (`test_advantages_match_trl`): TRL's ``_generate_and_score_completions`` samples 8
  completions from the tiny model and scores them with a reward function returning fixed
  rewards (one None: unscorable; one group with equal rewards); its advantages must be our
  `group_advantages` for scale_rewards group / batch / none, and its ``frac_reward_zero_std``
  our `zero_variance_groups`.
"""
from __future__ import annotations

import math

import pytest
import torch

trl = pytest.importorskip("trl")
transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402

from align.rl_losses import (aggregate_loss, group_advantages, policy_loss, zero_variance_groups)  # noqa: E402
from test_align_trl_parity import _quiet  # noqa: E402  (one silencer for both TRL parity files)

pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore::UserWarning")]

TOL = 1e-6
VOCAB, PAD, EOS = 32, 0, 1
G, P, T = 4, 3, 6                 # group size, prompt length, completion length
MAX_COMPLETION = 8                # TRL's max_completion_length (> T: dr_grpo must use the config's value)
LENGTHS = [6, 3, 1, 5, 0, 6, 2, 4]  # completion tokens per row; row 4 is empty (a masked truncated completion)
B = len(LENGTHS)
REWARDS = [1.0, 0.0, 2.0, 0.5, 3.0, 2.0, 1.0, 0.0]  # advantage signs +, -, +, - | +, +, -, -
# each row's mean log π/π_old (GSPO's log ratio); with ε = 0.2, ε_high = 0.28 and the signs above:
# row 0 in (1.2, 1.28] (clipped only when ε_high = ε), 1 and 6 clipped low, 2 clipped high, 3 inside,
# 5 below 1 - ε but A > 0 and 7 above 1 + ε_high but A < 0 (both unclipped: the pessimistic side)
ROW_LOG_RATIO = [0.22, -0.3, 0.4, 0.1, 0.0, -0.3, -0.4, 0.3]
EPS, EPS_HIGH, BETA = 0.2, 0.28, 0.04
HOW = {"grpo": "sequence_mean", "bnpo": "token_mean", "dapo": "token_mean", "dr_grpo": "dr_grpo"}


def _tokenizer():
    vocab = {"<pad>": PAD, "</s>": EOS, **{f"t{i}": i for i in range(2, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>")


def _zero_reward(completions, **_) -> list[float]:
    return [0.0] * len(completions)


class Setup:
    """A tiny random Llama on disk (TRL reloads it as the reference when β > 0), the tokenizer,
    a two-prompt dataset, and a fixed batch of per-token log-probs."""

    def __init__(self, root) -> None:
        self.root = root
        cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                       num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                                       pad_token_id=PAD, eos_token_id=EOS, bos_token_id=None)
        torch.manual_seed(0)
        transformers.LlamaForCausalLM(cfg).save_pretrained(root / "model")
        self.tokenizer = _tokenizer()
        self.prompts = ["t2 t3 t4", "t5 t6"]
        self.dataset = datasets.Dataset.from_list([{"prompt": p} for p in self.prompts])
        self.batch = _batch()

    def trainer(self, reward_func=None, **kw):
        kw.setdefault("per_device_train_batch_size", B)
        args = trl.GRPOConfig(output_dir=str(self.root / "out"), report_to="none", use_cpu=True, bf16=False,
                              num_generations=G, max_completion_length=MAX_COMPLETION, save_strategy="no", seed=0, **kw)
        model = transformers.AutoModelForCausalLM.from_pretrained(self.root / "model", dtype=torch.float32)
        trainer = trl.GRPOTrainer(model=model, reward_funcs=reward_func or _zero_reward, args=args,
                                  train_dataset=self.dataset, processing_class=self.tokenizer)
        trainer.model.train()
        trainer.current_gradient_accumulation_steps = args.gradient_accumulation_steps  # set by the training loop
        return trainer


def _batch() -> dict[str, torch.Tensor]:
    """Per-token log-probs (B, T) of the policy, the sampling policy and the reference; masks; ids."""
    g = torch.Generator().manual_seed(0)
    mask = (torch.arange(T)[None, :] < torch.tensor(LENGTHS)[:, None]).long()  # right-padded
    logps = -0.05 - 3 * torch.rand(B, T, generator=g)
    noise = 0.3 * torch.randn(B, T, generator=g) * mask
    noise = noise - (noise.sum(1, keepdim=True) / mask.sum(1, keepdim=True).clamp(min=1)) * mask  # zero row mean
    log_ratio = torch.tensor(ROW_LOG_RATIO)[:, None] + noise
    log_ratio = torch.where(mask.bool(), log_ratio, torch.randn(B, T, generator=g))  # garbage on padding
    completion_ids = torch.randint(2, VOCAB, (B, T), generator=g) * mask + PAD * (1 - mask)
    return {
        "prompt_ids": torch.randint(2, VOCAB, (B, P), generator=g), "prompt_mask": torch.ones(B, P, dtype=torch.long),
        "completion_ids": completion_ids, "completion_mask": mask,
        "logps": logps, "old_logps": logps - log_ratio, "ref_logps": logps + 0.6 * torch.randn(B, T, generator=g),
        "advantages": group_advantages(torch.tensor(REWARDS), G, "group"),
    }


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    with _quiet():
        yield Setup(tmp_path_factory.mktemp("rl_trl_parity"))


def _close(ours, theirs, what: str) -> None:
    ours, theirs = torch.as_tensor(ours, dtype=torch.float64), torch.as_tensor(theirs, dtype=torch.float64)
    diff = (ours - theirs).abs().max().item()
    assert diff <= TOL, f"{what}: ours {ours.tolist()} vs TRL {theirs.tolist()} (max diff {diff:.3g})"


def _trl_loss(trainer, batch: dict, rows: slice, num_items: torch.Tensor,
              monkeypatch) -> tuple[torch.Tensor, torch.Tensor]:
    """TRL's ``_compute_loss`` on rows of the batch, its per-token log-probs replaced by ours;
    returns (loss, d loss / d logps of those rows)."""
    logps = batch["logps"][rows].clone().requires_grad_()

    def per_token_logps(model, input_ids, attention_mask, logits_to_keep, **_):
        assert logits_to_keep == T and input_ids.shape == (logps.shape[0], P + T)
        return logps, torch.zeros_like(logps), None  # (log-probs, entropies, aux loss)

    monkeypatch.setattr(trainer, "_get_per_token_logps_and_entropies", per_token_logps)
    inputs = {k: batch[k][rows] for k in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask",
                                          "advantages")}
    inputs.update(old_per_token_logps=batch["old_logps"][rows], ref_per_token_logps=batch["ref_logps"][rows],
                  num_items_in_batch=num_items)
    with _quiet():
        loss = trainer._compute_loss(trainer.model, inputs)
    loss.backward()
    return loss.detach(), logps.grad


def _our_loss(batch: dict, rows: slice, loss_type: str, level: str, beta: float, epsilon_high,
              correction: bool = False, **over):
    """Our policy_loss → aggregate_loss on the same rows: (loss_sum, normaliser, output, d loss_sum / d logps)."""
    logps = batch["logps"][rows].clone().requires_grad_()
    mask = batch["completion_mask"][rows]
    kw = dict(epsilon=EPS, epsilon_high=epsilon_high, level=level, ref_logps=batch["ref_logps"][rows], beta=beta,
              kl_importance_correction=correction)
    kw.update(over)
    out = policy_loss(logps, batch["old_logps"][rows], batch["advantages"][rows], mask, **kw)
    loss_sum, normaliser = aggregate_loss(out.per_token, mask, HOW[loss_type], MAX_COMPLETION)
    loss_sum.backward()
    return loss_sum.detach(), normaliser, out, logps.grad


# KL: "off" (β = 0), "k3" (β·k3), "k3_is" (β·ρ·k3: TRL's default use_bias_correction_kl=True)
CASES = [(lt, level, kl, eh) for level in ("token", "sequence") for lt in ("grpo", "bnpo", "dr_grpo", "dapo")
         for kl in ("off", "k3", "k3_is") for eh in (None, EPS_HIGH)]


@pytest.mark.parametrize("loss_type,level,kl,epsilon_high", CASES,
                         ids=[f"{lt}-{lv}-kl_{kl}-epshigh{eh}" for lt, lv, kl, eh in CASES])
def test_loss_matches_trl(setup: Setup, monkeypatch, loss_type: str, level: str, kl: str, epsilon_high) -> None:
    b, rows = setup.batch, slice(None)
    beta, correction = (0.0 if kl == "off" else BETA), kl == "k3_is"
    with _quiet():
        trainer = setup.trainer(loss_type=loss_type, importance_sampling_level=level, beta=beta, epsilon=EPS,
                                epsilon_high=epsilon_high, use_bias_correction_kl=correction)
    num_items = b["completion_mask"].sum()
    theirs, theirs_grad = _trl_loss(trainer, b, rows, num_items, monkeypatch)
    loss_sum, n, out, grad = _our_loss(b, rows, loss_type, level, beta, epsilon_high, correction)
    _close(loss_sum / n, theirs, f"{loss_type} loss")
    _close(grad / n, theirs_grad, f"{loss_type} gradient")
    assert theirs_grad.abs().max() > 1e-3

    mask = b["completion_mask"].bool()
    metrics = trainer._metrics["train"]
    if level == "token":  # TRL's global_masked_mean: over completion tokens
        frac = {k: (v.sum() / mask.sum()).item() for k, v in (("low", out.clip_low), ("high", out.clip_high))}
        frac["region"] = ((out.clip_low | out.clip_high).sum() / mask.sum()).item()
    else:  # one value per sequence, empty rows included
        frac = {k: v.any(1).float().mean().item() for k, v in (("low", out.clip_low), ("high", out.clip_high))}
        frac["region"] = (out.clip_low | out.clip_high).any(1).float().mean().item()
    for key in ("low", "high", "region"):
        _close(frac[key], metrics[f"clip_ratio/{key}_mean"][-1], f"clip_ratio/{key}_mean")
    if beta:
        _close(out.kl.sum() / mask.sum(), metrics["kl"][-1], "kl")

    # the parameters matter: a 10% wrong β, the other KL form, or ε_high dropped is far outside the tolerance
    wrongs = []
    if beta:
        wrongs += [(beta * 1.1, epsilon_high, correction), (beta, epsilon_high, not correction)]
    if epsilon_high is not None:
        wrongs.append((beta, None, correction))
    for wrong_beta, wrong_eh, wrong_corr in wrongs:
        wrong_sum, wrong_n, _, _ = _our_loss(b, rows, loss_type, level, wrong_beta, wrong_eh, wrong_corr)
        assert (wrong_sum / wrong_n - theirs).abs() > 100 * TOL, (wrong_beta, wrong_eh, wrong_corr)


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_batch_exercises_every_clip_branch(setup: Setup, level: str) -> None:
    """The parity batch is not degenerate: some ratios are clipped low, some high, some only by
    ε (not by ε_high), some not at all, some outside the range on the unclipped side of the min;
    the empty row has no loss."""
    b = setup.batch
    mask = b["completion_mask"].bool()
    out = policy_loss(b["logps"], b["old_logps"], b["advantages"], mask, EPS, EPS_HIGH, level=level)
    adv = b["advantages"][:, None].expand_as(mask)
    assert out.clip_low.any() and out.clip_high.any()
    window = (out.ratio > 1 + EPS) & (out.ratio <= 1 + EPS_HIGH) & (adv > 0) & mask
    assert window.any(), "no ratio between 1 + ε and 1 + ε_high: ε_high would go untested"
    assert (mask & ~out.clip_low & ~out.clip_high & (adv != 0)).any()
    # outside the clip range on the side where the min keeps the unclipped term: must not count as clipped
    assert ((out.ratio < 1 - EPS) & (adv > 0) & mask).any() and ((out.ratio > 1 + EPS_HIGH) & (adv < 0) & mask).any()
    assert out.per_token[4].abs().sum() == 0 and not mask[4].any()


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo", "bnpo"])
def test_accumulation_matches_trl(setup: Setup, monkeypatch, loss_type: str) -> None:
    """Two micro-batches of 4 with 2 accumulation steps: TRL's micro-batch losses summed = our
    summed loss_sum / summed normaliser (bnpo: only per micro-batch; its mean of means differs)."""
    b = setup.batch
    with _quiet():
        trainer = setup.trainer(loss_type=loss_type, beta=BETA, epsilon=EPS, epsilon_high=EPS_HIGH,
                                per_device_train_batch_size=B // 2, gradient_accumulation_steps=2,
                                use_bias_correction_kl=True)
    assert trainer.args.steps_per_generation == 2
    num_items = b["completion_mask"].sum()  # TRL: the token count of the whole generation batch
    halves = (slice(0, B // 2), slice(B // 2, B))
    theirs = sum(_trl_loss(trainer, b, rows, num_items, monkeypatch)[0] for rows in halves)
    ours = [_our_loss(b, rows, loss_type, "token", BETA, EPS_HIGH, correction=True) for rows in halves]
    combined = sum(o[0] for o in ours) / sum(o[1] for o in ours)
    per_micro_mean = sum(o[0] / o[1] for o in ours) / 2
    if loss_type == "bnpo":
        _close(per_micro_mean, theirs, "bnpo: mean of the micro-batch token means")
        assert (combined - theirs).abs() > 100 * TOL
    else:
        _close(combined, theirs, f"{loss_type} accumulated loss")


@pytest.mark.parametrize("scale_rewards", ["group", "batch", "none"])
def test_advantages_match_trl(setup: Setup, scale_rewards: str) -> None:
    rewards = [1.0, None, 3.0, 0.5, 2.0, 2.0, 2.0, 2.0]  # one unscorable completion; group 1 all equal

    def reward_func(completions, **_):
        assert len(completions) == B
        return list(rewards)

    with _quiet():
        trainer = setup.trainer(reward_func, scale_rewards=scale_rewards, beta=0.0)
        rows = [{"prompt": p} for p in setup.prompts for _ in range(G)]  # TRL's sampler repeats each prompt G times
        out = trainer._generate_and_score_completions(rows)
    r = torch.tensor([math.nan if x is None else x for x in rewards])
    ours = group_advantages(r, G, scale_rewards)
    _close(ours, out["advantages"], f"advantages ({scale_rewards})")
    assert ours[1] == 0 and (ours[4:] == 0).all() and (ours[[0, 2, 3]] != 0).all()
    if scale_rewards != "batch":  # TRL's is_std_zero is per group there (per batch otherwise)
        _close(zero_variance_groups(r, G).float().mean(), trainer._metrics["train"]["frac_reward_zero_std"][-1],
               "frac_reward_zero_std")
