"""Our alignment losses equal TRL's own code (trl 1.16), run on the same tiny model and data.

One tiny random llama-family model (the policy) and a second one with other weights (the
reference) are built with `model.build_model`, exported with `model.hf.save_hf_dir` and loaded
back with ``transformers.AutoModelForCausalLM`` (fp32, dropout 0). Four preference pairs of
random token ids with uneven prompt and response lengths (so every row is padded differently)
are written as a real preference bin and read by our `PreferenceLoader` / `KTOLoader`.

* DPO (`test_dpo_matches_trl_trainer`): a real ``trl.DPOTrainer`` per loss type (sigmoid, ipo,
  hinge, robust with ε = 0.2, bco_pair, and RPO as TRL 1.16 spells it: ``loss_type=["sigmoid",
  "sft"]``, ``loss_weights=[1, α]``), built from the HF policy, the HF reference, a tiny text
  dataset and an offline word-level tokenizer (one word per token id). TRL tokenizes that
  dataset itself (`_prepare_dataset`: EOS appended, prompt / completion split): its ids must be
  the ids of our bin. Its own collator (`DataCollatorForPreference`) pads them, and its
  ``_compute_loss`` (train mode) must give our ``PreferenceObjective`` loss (``loss_sum /
  n_tokens``); its logged metrics (rewards/chosen, rejected, margins, accuracies, logps/chosen,
  rejected) must equal our ``sums / n``; ``compute_ref_log_probs`` (per-sequence log-probs of a
  given model) must equal our ``pair_logps`` for both the policy and the reference.
  TRL 1.16's ``sigmoid`` ignores ``label_smoothing`` (cDPO was dropped; it only feeds robust /
  exo_pair), while ours applies it as cDPO: the parity is checked at ε = 0 and the cDPO form by
  hand (`test_cdpo_label_smoothing_by_hand`).
* KTO (`test_kto_matches_trl_trainer`): a real ``trl.KTOTrainer``. TRL builds its KL
  (mismatched) completions by rotating completions inside a batch, our `KTOLoader` pairs pair i
  with the same side of pair i + 1; TRL's collator (`DataCollatorForUnpairedPreference`) is fed
  our loader's rows, KL rows included, so both compute the same quantity; TRL's
  ``compute_ref_log_probs`` (example and KL log-probs) must equal our `reference_columns`, and
  the loss, z0 (TRL's ``kl`` metric, checked to be > 0 so the clamp does not hide it) and the
  reward / logps metrics must agree.
* ORPO, SimPO (`test_orpo_odds_ratio_matches_trl`, `test_simpo_matches_trl_cpo`): the TRL
  trainers are experimental and tokenise their own way, so their loss methods are called as
  unbound functions (``ORPOTrainer.odds_ratio_loss``, ``CPOTrainer.cpo_loss`` with
  ``loss_type="simpo"``) on a stand-in ``self``, with TRL's own ``get_batch_logps``
  (average_log_prob=True) run on the HF model's logits. TRL's ORPO NLL term covers prompt +
  response tokens; ours follows the ORPO paper (response tokens only), so the NLL term is
  checked by hand against the HF logits instead. Our ORPO metrics use TRL's names: ``log_odds_chosen``
  (mean log odds ratio) and ``log_odds_ratio``, the mean of
  log σ(log odds). SimPO is checked with and without label smoothing.
* Reward model (`test_reward_loss_matches_trl_trainer`): our `RewardModel`, exported with
  `save_hf_reward_dir`, in a real ``trl.RewardTrainer`` (margin and center_rewards_coefficient):
  its ``compute_loss`` must equal our ``RewardObjective`` loss and its accuracy / margin metrics.

Every comparison is to 1e-5, and each test also checks that a 10% wrong β (or margin)
moves the result far beyond that, so a wrong parameter could not pass.
"""
from __future__ import annotations

import contextlib
import logging
import types
from pathlib import Path

import numpy as np
import pytest
import torch

trl = pytest.importorskip("trl")
transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402

from align.config import AlignSection, RewardSection  # noqa: E402
from align.data import KTOLoader  # noqa: E402
from align.losses import dpo_loss, orpo_odds_ratio, simpo_loss  # noqa: E402
from align.objectives import KTOObjective, PreferenceObjective, RewardObjective, pair_logps  # noqa: E402
from align.reference import reference_columns  # noqa: E402
from data_pipeline.chat_loaders import PreferenceLoader  # noqa: E402
from data_pipeline.formats import TokenBinWriter  # noqa: E402
from model import ModelConfig, build_model  # noqa: E402
from model.hf import save_hf_dir, save_hf_reward_dir  # noqa: E402
from model.reward import RewardModel  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore::UserWarning")]

TOL = 1e-5
VOCAB, PAD, EOS = 256, 0, 1
# (prompt, chosen, rejected) lengths; responses end with EOS (TRL appends it to every completion)
LENGTHS = [(3, 4, 7), (7, 2, 5), (1, 9, 3), (5, 6, 1)]
N = len(LENGTHS)
CFG = ModelConfig(family="llama", vocab_size=VOCAB, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden_dim=128,
                  max_seq_len=64, init_std=0.1)
BIN_META = dict(vocab_size=VOCAB, tokenizer_hash="trl-parity", eos_id=EOS, pad_id=PAD, created_by="test", source={})


@contextlib.contextmanager
def _quiet():
    """Silence transformers / datasets / TRL logging and progress bars, and restore them after."""
    hf_logging = transformers.utils.logging
    verbosity, loggers = hf_logging.get_verbosity(), {n: logging.getLogger(n) for n in ("trl", "accelerate")}
    levels = {n: lg.level for n, lg in loggers.items()}
    datasets_bars, hf_bars = datasets.is_progress_bar_enabled(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    datasets.disable_progress_bars()
    for lg in loggers.values():
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if hf_bars:
            hf_logging.enable_progress_bar()
        if datasets_bars:
            datasets.enable_progress_bars()
        for n, lg in loggers.items():
            lg.setLevel(levels[n])


@torch.no_grad()
def _random_model(seed: int, cls=None) -> torch.nn.Module:
    """Our model with random weights; norm weights moved off 1 so every parameter matters."""
    torch.manual_seed(seed)
    model = build_model(CFG) if cls is None else cls(CFG)
    g = torch.Generator().manual_seed(seed + 100)
    for p in model.parameters():
        if p.dim() == 1:
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    if cls is RewardModel:
        model.score.weight.copy_(torch.randn(model.score.weight.shape, generator=g))
    return model


def _pairs() -> list[tuple[list[int], list[int], list[int]]]:
    rng = np.random.default_rng(0)
    out = []
    for lp, lc, lr in LENGTHS:
        prompt, chosen, rejected = (rng.integers(2, VOCAB, n).tolist() for n in (lp, lc - 1, lr - 1))
        out.append((prompt, chosen + [EOS], rejected + [EOS]))
    return out


def _words(ids: list[int]) -> str:
    """Token ids as text for the word-level tokenizer: 't7 t9</s>' (EOS is a special token)."""
    return " ".join(f"t{i}" for i in ids if i != EOS) + ("</s>" if ids and ids[-1] == EOS else "")


def _tokenizer():
    vocab = {"<pad>": PAD, "</s>": EOS, **{f"t{i}": i for i in range(2, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>")


class Setup:
    """Everything the tests share (module scope): models, HF exports, bins, loaders' batches."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.policy, self.ref = _random_model(0), _random_model(1)
        for model in (self.policy, self.ref):
            model.eval()  # dropout is 0 anyway; train/eval give the same logits
        save_hf_dir(CFG, self.policy.state_dict(), root / "hf_policy")
        save_hf_dir(CFG, self.ref.state_dict(), root / "hf_ref")
        self.pairs = _pairs()
        base = root / "pref"
        with TokenBinWriter(base, "uint16", parts_per_item=3) as w:
            for p in self.pairs:
                w.add(p)
            w.close(kind="preference", **BIN_META)
        self.batch = next(PreferenceLoader(base, batch_size=N, shuffle=False))
        self.kto_batch = next(KTOLoader(base, batch_size=N, shuffle=False))
        self.tokenizer = _tokenizer()
        self.text = datasets.Dataset.from_list([{"prompt": _words(p), "chosen": " " + _words(c),
                                                 "rejected": " " + _words(r)} for p, c, r in self.pairs])

    def hf(self, which: str):
        """A fresh HF copy (TRL patches the forward of the models it is given)."""
        return transformers.AutoModelForCausalLM.from_pretrained(self.root / f"hf_{which}", dtype=torch.float32)

    def args(self, cls, **kw):
        """A TRL config for this CPU: fp32 (TRL's default is bf16), no checkpointing, no dropout."""
        if cls is not trl.RewardConfig:
            kw.update(precompute_ref_log_probs=False, max_length=None)
        return cls(output_dir=str(self.root / "out"), report_to="none", use_cpu=True, bf16=False,
                   gradient_checkpointing=False, per_device_train_batch_size=2 * N if cls is trl.KTOConfig else N,
                   disable_dropout=True, save_strategy="no", seed=0, **kw)


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> Setup:
    with _quiet():
        yield Setup(tmp_path_factory.mktemp("trl_parity"))


def _ref_fn(setup: Setup, kto: bool = False):
    return lambda b: reference_columns(setup.ref, b, kto)


def _close(ours, theirs, what: str) -> None:
    ours, theirs = torch.as_tensor(ours, dtype=torch.float64), torch.as_tensor(theirs, dtype=torch.float64)
    diff = (ours - theirs).abs().max().item()
    assert diff <= TOL, f"{what}: ours {ours.tolist()} vs TRL {theirs.tolist()} (max diff {diff:.3g})"


# ------------------------------------------------------------------------------------------------ DPO
DPO_CASES = {  # id → (our AlignSection keys, TRL DPOConfig keys)
    "sigmoid": (dict(loss_type="sigmoid"), dict(loss_type=["sigmoid"])),
    "ipo": (dict(loss_type="ipo"), dict(loss_type=["ipo"])),
    "hinge": (dict(loss_type="hinge"), dict(loss_type=["hinge"])),
    "robust": (dict(loss_type="robust", label_smoothing=0.2), dict(loss_type=["robust"], label_smoothing=0.2)),
    "bco_pair": (dict(loss_type="bco_pair"), dict(loss_type=["bco_pair"])),
    "rpo": (dict(loss_type="sigmoid", rpo_alpha=0.7), dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.7])),
}
BETA = {"sigmoid": 0.3, "ipo": 0.5, "hinge": 0.5, "robust": 0.3, "bco_pair": 0.2, "rpo": 0.3}


def _dpo_trainer(setup: Setup, beta: float, **trl_kw):
    return trl.DPOTrainer(model=setup.hf("policy"), ref_model=setup.hf("ref"),
                          args=setup.args(trl.DPOConfig, beta=beta, **trl_kw),
                          train_dataset=setup.text, processing_class=setup.tokenizer)


def _trl_inputs(setup: Setup, trainer) -> dict:
    """TRL's own tokenization of the text dataset must be our bin; its collator pads it."""
    rows = [trainer.train_dataset[i] for i in range(N)]
    for row, (p, c, r) in zip(rows, setup.pairs):
        assert (row["prompt_ids"], row["chosen_ids"], row["rejected_ids"]) == (p, c, r)
    inputs = trainer.data_collator(rows)
    # the same rows as ours: TRL's labels (input_ids where completion_mask) shifted = our labels
    b = setup.batch
    for half, side in ((slice(0, N), "chosen"), (slice(N, 2 * N), "rejected")):
        t = inputs["input_ids"].shape[1]
        assert torch.equal(inputs["input_ids"][half], b[f"{side}_input_ids"][:, :t])
        trl_labels = inputs["input_ids"][half].masked_fill(inputs["completion_mask"][half] == 0, -100)
        assert torch.equal(trl_labels[:, 1:], b[f"{side}_labels"][:, :t - 1])
    return inputs


@pytest.mark.parametrize("case", list(DPO_CASES))
def test_dpo_matches_trl_trainer(setup: Setup, case: str) -> None:
    ours_kw, trl_kw = DPO_CASES[case]
    beta = BETA[case]
    trainer = _dpo_trainer(setup, beta, **trl_kw)
    inputs = _trl_inputs(setup, trainer)

    # per-sequence log-probs of the policy and of the reference: TRL's compute_ref_log_probs
    for ours_model, theirs_model in ((setup.policy, trainer.model), (setup.ref, trainer.ref_model)):
        theirs = trainer.compute_ref_log_probs(theirs_model, inputs)
        with torch.no_grad():
            ours = pair_logps(ours_model, setup.batch)
        _close(ours.chosen, theirs[0], "chosen logps")
        _close(ours.rejected, theirs[1], "rejected logps")

    trainer.model.train()
    setup.policy.train()
    theirs_loss = trainer._compute_loss(trainer.model, inputs, return_outputs=False)
    section = AlignSection(method="dpo", beta=beta, **ours_kw)
    section.fill_defaults()
    out = PreferenceObjective(section, _ref_fn(setup))(setup.policy, setup.batch)
    setup.policy.eval()
    _close(out.loss_sum.detach() / out.n_tokens, theirs_loss.detach(), f"{case} loss")

    metrics = trainer._metrics["train"]
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
                "logps/rejected"):
        _close(out.sums[key] / out.n_tokens, metrics[key][-1], key)
    accuracy = metrics["rewards/accuracies"][-1]
    assert 0 < accuracy < 1, "all pairs on one side: the accuracy metric would prove little"

    # a 10% wrong beta is far outside the tolerance
    with torch.no_grad():
        pol, ref = pair_logps(setup.policy, setup.batch), reference_columns(setup.ref, setup.batch, kto=False)
    wrong = dpo_loss(pol.chosen, pol.rejected, ref[:, 0], ref[:, 1], beta * 1.1, section.loss_type,
                     section.label_smoothing, pol.chosen_tokens, pol.rejected_tokens).losses.mean()
    right = dpo_loss(pol.chosen, pol.rejected, ref[:, 0], ref[:, 1], beta, section.loss_type,
                     section.label_smoothing, pol.chosen_tokens, pol.rejected_tokens).losses.mean()
    assert (wrong - right).abs() > 100 * TOL


def test_cdpo_label_smoothing_by_hand(setup: Setup) -> None:
    """TRL 1.16's sigmoid loss no longer takes label_smoothing (it did as cDPO up to 0.x); ours
    keeps cDPO: ``(1-ε)·L(βh) + ε·L(-βh)``, i.e. TRL's sigmoid loss on h and on -h, mixed."""
    beta, eps = 0.3, 0.2
    with torch.no_grad():
        pol, ref = pair_logps(setup.policy, setup.batch), reference_columns(setup.ref, setup.batch, kto=False)
    ours = dpo_loss(pol.chosen, pol.rejected, ref[:, 0], ref[:, 1], beta, "sigmoid", eps).losses
    plain = dpo_loss(pol.chosen, pol.rejected, ref[:, 0], ref[:, 1], beta, "sigmoid").losses
    flipped = dpo_loss(pol.rejected, pol.chosen, ref[:, 1], ref[:, 0], beta, "sigmoid").losses
    _close(ours, (1 - eps) * plain + eps * flipped, "cDPO")
    assert (ours - plain).abs().max() > 100 * TOL


# ------------------------------------------------------------------------------------------------ KTO
def test_kto_matches_trl_trainer(setup: Setup) -> None:
    beta, w_good, w_bad = 0.6, 1.3, 0.8
    trainer = trl.KTOTrainer(model=setup.hf("policy"), ref_model=setup.hf("ref"),
                             args=setup.args(trl.KTOConfig, beta=beta, desirable_weight=w_good,
                                             undesirable_weight=w_bad),
                             train_dataset=setup.text, processing_class=setup.tokenizer)
    # our KTOLoader's examples: desirable (x_i, y_c,i) first, then undesirable (x_i, y_r,i); KL rows pair
    # x_i with the same side of pair i + 1 (mod N)
    examples = []
    for side in (1, 2):
        for i, pair in enumerate(setup.pairs):
            partner = setup.pairs[(i + 1) % N]
            examples.append({"prompt_ids": pair[0], "completion_ids": pair[side], "KL_completion_ids": partner[side],
                             "label": side == 1})
    inputs = trainer.data_collator(examples)
    b = setup.kto_batch
    for prefix, ours_prefix in (("", ""), ("KL_", "kl_")):
        t = inputs[f"{prefix}input_ids"].shape[1]
        assert torch.equal(inputs[f"{prefix}input_ids"], b[f"{ours_prefix}input_ids"][:, :t])
        trl_labels = inputs[f"{prefix}input_ids"].masked_fill(inputs[f"{prefix}completion_mask"] == 0, -100)
        assert torch.equal(trl_labels[:, 1:], b[f"{ours_prefix}labels"][:, :t - 1])
    assert torch.equal(inputs["label"].long(), b["desirable"])

    # per-sequence log-probs of the examples and of the KL rows: TRL's compute_ref_log_probs
    for ours_model, theirs_model in ((setup.policy, trainer.model), (setup.ref, trainer.ref_model)):
        logps, kl_logps = trainer.compute_ref_log_probs(theirs_model, inputs)  # (2N,) each
        ours = reference_columns(ours_model, b, kto=True)  # (N, 4): chosen, rejected, kl chosen, kl rejected
        _close(torch.cat([ours[:, 0], ours[:, 1]]), logps, "KTO logps")
        _close(torch.cat([ours[:, 2], ours[:, 3]]), kl_logps, "KTO KL logps")

    trainer.model.train()
    setup.policy.train()
    theirs = trainer._compute_loss(trainer.model, inputs, return_outputs=False)
    section = AlignSection(method="kto", beta=beta, desirable_weight=w_good, undesirable_weight=w_bad)
    section.fill_defaults()
    out = KTOObjective(section, _ref_fn(setup, kto=True))(setup.policy, b)
    setup.policy.eval()
    _close(out.loss_sum.detach() / out.n_tokens, theirs.detach(), "KTO loss")

    metrics = trainer._metrics["train"]
    assert metrics["kl"][-1] > 0.05, "z0 clamped to 0: the KL term would go untested"
    for key in ("kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"):
        _close(out.sums[key] / out.n_tokens, metrics[key][-1], key)

    section.beta = beta * 1.1
    wrong = KTOObjective(section, _ref_fn(setup, kto=True))(setup.policy, b)
    assert (wrong.loss_sum / wrong.n_tokens - theirs).abs() > 100 * TOL


# ------------------------------------------------------------------------------------ ORPO and SimPO
def _trl_avg_logps(setup: Setup, trainer_cls) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """TRL's own ``get_batch_logps(average_log_prob=True)`` on the HF policy's logits over [chosen;
    rejected] rows labelled the TRL way (unshifted, -100 on prompt and padding); and the logits."""
    b = setup.batch
    ids = torch.cat([b["chosen_input_ids"], b["rejected_input_ids"]])
    labels = torch.cat([b["chosen_labels"], b["rejected_labels"]])
    trl_labels = torch.full_like(labels, -100)
    trl_labels[:, 1:] = labels[:, :-1]  # ours: labels[t] = token t+1; TRL's: labels[t] = token t
    mask = torch.cat([b["chosen_attention_mask"], b["rejected_attention_mask"]])
    with torch.no_grad():
        logits = setup.hf("policy").eval()(input_ids=ids, attention_mask=mask).logits
    avg = trainer_cls.get_batch_logps(logits, trl_labels, average_log_prob=True)
    return avg[:N], avg[N:], logits


def _stand_in(**kw) -> types.SimpleNamespace:
    return types.SimpleNamespace(accelerator=types.SimpleNamespace(device=torch.device("cpu")), **kw)


def test_orpo_odds_ratio_matches_trl(setup: Setup) -> None:
    from trl.experimental.orpo import ORPOTrainer

    beta = 0.25
    avg_c, avg_r, logits = _trl_avg_logps(setup, ORPOTrainer)
    with torch.no_grad():
        pol = pair_logps(setup.policy, setup.batch)
    _close(pol.chosen / pol.chosen_tokens, avg_c, "chosen average logps")
    _close(pol.rejected / pol.rejected_tokens, avg_r, "rejected average logps")

    theirs = ORPOTrainer.odds_ratio_loss(_stand_in(beta=beta), avg_c, avg_r)
    ours, log_odds = orpo_odds_ratio(avg_c, avg_r, beta)
    _close(ours.losses, -theirs[0], "ORPO odds-ratio term")  # TRL returns +β log σ and subtracts it
    _close(ours.chosen_rewards, theirs[1], "rewards/chosen")
    _close(ours.rejected_rewards, theirs[2], "rewards/rejected")
    _close(log_odds.mean(), theirs[4], "log_odds_chosen")

    # the whole objective: odds-ratio term (TRL's) + the token-mean NLL of the chosen responses only (by hand)
    section = AlignSection(method="orpo", beta=beta)
    section.fill_defaults()
    with torch.no_grad():
        out = PreferenceObjective(section, None)(setup.policy, setup.batch)
    b = setup.batch
    chosen_logits = logits[:N, :-1]
    target = b["chosen_input_ids"][:, 1:]
    response = b["chosen_labels"][:, :-1] != -100
    token_logps = torch.log_softmax(chosen_logits.double(), -1).gather(-1, target[..., None]).squeeze(-1)
    nll = -token_logps[response].mean()
    _close(out.loss_sum / out.n_tokens, nll - theirs[0].double().mean(), "ORPO loss")
    _close(out.sums["nll_loss"] / out.n_tokens, nll, "nll_loss")
    for key, value in (("rewards/chosen", theirs[1]), ("rewards/rejected", theirs[2]),
                       ("rewards/margins", theirs[1] - theirs[2]),
                       ("rewards/accuracies", (theirs[1] > theirs[2]).float())):
        _close(out.sums[key] / out.n_tokens, value.mean(), key)
    _close(out.sums["log_odds_chosen"] / out.n_tokens, theirs[4], "log_odds_chosen")
    _close(out.sums["log_odds_ratio"] / out.n_tokens, theirs[3], "log_odds_ratio (mean log σ(log odds))")
    wrong = orpo_odds_ratio(avg_c, avg_r, beta * 1.1)[0].losses
    assert (wrong - ours.losses).abs().max() > 100 * TOL


def test_simpo_matches_trl_cpo(setup: Setup) -> None:
    from trl.experimental.cpo import CPOTrainer

    beta, gamma, eps = 2.5, 0.8, 0.1
    avg_c, avg_r, _ = _trl_avg_logps(setup, CPOTrainer)
    section = AlignSection(method="simpo", beta=beta, gamma=gamma, label_smoothing=eps)
    section.fill_defaults()
    with torch.no_grad():
        out = PreferenceObjective(section, None)(setup.policy, setup.batch)
    for smoothing in (0.0, eps):
        stand_in = _stand_in(beta=beta, label_smoothing=smoothing, loss_type="simpo", simpo_gamma=gamma, alpha=0.0)
        theirs = CPOTrainer.cpo_loss(stand_in, avg_c, avg_r)
        ours = simpo_loss(avg_c, avg_r, beta, gamma, smoothing)
        _close(ours.losses, theirs[0], f"SimPO loss (ε={smoothing})")
        _close(ours.chosen_rewards, theirs[1], "rewards/chosen")
        _close(ours.rejected_rewards, theirs[2], "rewards/rejected")
    # the objective on our model's own log-probs (cpo_alpha = 0: no NLL term in SimPO)
    _close(out.loss_sum / out.n_tokens, theirs[0].mean(), "SimPO objective")
    for key, value in (("rewards/chosen", theirs[1]), ("rewards/rejected", theirs[2]),
                       ("rewards/accuracies", (theirs[1] > theirs[2]).float())):
        _close(out.sums[key] / out.n_tokens, value.mean(), key)
    wrong = simpo_loss(avg_c, avg_r, beta * 1.1, gamma, eps).losses
    assert (wrong - ours.losses).abs().max() > 100 * TOL


# ------------------------------------------------------------------------------------------- reward
def test_reward_loss_matches_trl_trainer(setup: Setup) -> None:
    margin, center = 0.3, 0.05
    ours_model = _random_model(2, RewardModel).eval()
    save_hf_reward_dir(CFG, ours_model.state_dict(), setup.root / "hf_reward", pad_token_id=PAD)
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(setup.root / "hf_reward",
                                                                        dtype=torch.float32)
    rows = [{"chosen_ids": p + c, "rejected_ids": p + r, "margin": margin} for p, c, r in setup.pairs]
    trainer = trl.RewardTrainer(model=hf, args=setup.args(trl.RewardConfig, center_rewards_coefficient=center),
                                train_dataset=datasets.Dataset.from_list(rows), processing_class=setup.tokenizer)
    inputs = trainer.data_collator(rows)
    trainer.model.train()
    ours_model.train()
    theirs = trainer.compute_loss(trainer.model, inputs)
    out = RewardObjective(RewardSection(margin=margin, center_rewards_coefficient=center))(ours_model, setup.batch)
    _close(out.loss_sum.detach() / out.n_tokens, theirs.detach(), "reward loss")
    metrics = trainer._metrics["train"]
    for key in ("accuracy", "margin"):
        _close(out.sums[key] / out.n_tokens, metrics[key][-1], key)
    assert 0 < metrics["accuracy"][-1] < 1
    for wrong in (RewardSection(margin=margin * 1.1, center_rewards_coefficient=center),
                  RewardSection(margin=margin, center_rewards_coefficient=center * 1.1)):
        bad = RewardObjective(wrong)(ours_model, setup.batch)
        assert (bad.loss_sum / bad.n_tokens - theirs).abs() > 100 * TOL
