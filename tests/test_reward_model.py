"""Reward models outside training: the last-token read-out, Hugging Face export / import, scoring.

References: a per-row forward without padding (the read-out), `transformers`'
``AutoModelForSequenceClassification`` on the exported weights (it reads the reward at the last
token that is not ``pad_token_id``), and `build_preference_bins.encode_pair` (what the reward
model trained on) for `align/score.py`. Models are tiny and random; no download.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import assert_user_error, run_script
from data_pipeline.chat import ChatTokenizer
from data_pipeline.processing.build_preference_bins import encode_pair
from model import build_model, get_preset
from model.config import ModelConfig
from model.hf import HFFormatError, load_hf_dir, load_hf_reward_dir, save_hf_dir, save_hf_reward_dir
from model.reward import RewardModel
from test_sft import VOCAB, make_tokenizer
from utils.checkpoint import REWARD_MODEL, load_checkpoint, save_checkpoint
from utils.errors import UserError

ATOL = 1e-4
SEQ_LEN = 40  # longer than every preset's sliding window
PAD = 0  # the pad id of the export tests: real tokens are drawn from 1..vocab-1
TOK_VOCAB = VOCAB  # the tokenizer of tests/test_sft.py

try:  # the reference (a dev requirement); only the tests that compare with it need it
    import transformers
except ImportError:
    transformers = None
needs_transformers = pytest.mark.skipif(transformers is None, reason="transformers is not installed")


@torch.no_grad()
def _random_reward_model(cfg: ModelConfig, seed: int = 0) -> RewardModel:
    """A reward model with random weights, norm weights and biases moved off their inits, a
    score head large enough for the comparisons to mean something."""
    torch.manual_seed(seed)
    model = RewardModel(cfg)
    g = torch.Generator().manual_seed(seed + 1)
    for name, p in model.named_parameters():
        if p.dim() == 1:
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    model.score.weight.copy_(torch.randn(model.score.weight.shape, generator=g))
    return model.eval()


def _right_padded(vocab: int, lengths: list[int], seed: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """tokens (B, T) with real ids in 1..vocab-1 then PAD, attention_mask (B, T)."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    tokens = torch.full((len(lengths), width), PAD, dtype=torch.long)
    mask = torch.zeros((len(lengths), width), dtype=torch.long)
    for b, n in enumerate(lengths):
        tokens[b, :n] = torch.randint(1, vocab, (n,), generator=g)
        mask[b, :n] = 1
    return tokens, mask


# ---------------------------------------------------------------- (a) the read-out
def test_reward_is_read_at_the_last_real_token() -> None:
    cfg = get_preset("tiny-llama3", init_std=0.1)
    model = _random_reward_model(cfg)
    lengths = [SEQ_LEN, 7, 23, 1]
    tokens, mask = _right_padded(cfg.vocab_size, lengths)
    tokens[mask == 0] = torch.randint(1, cfg.vocab_size, (int((mask == 0).sum()),))  # junk padding: must not matter
    with torch.no_grad():
        batched = model(tokens, attention_mask=mask)  # (B,)
        alone = torch.stack([model(tokens[b:b + 1, :n])[0] for b, n in enumerate(lengths)])
        unmasked = model(tokens)  # no mask: the last position
    assert batched.shape == (len(lengths),)
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=0)
    assert torch.allclose(unmasked[0], batched[0], atol=1e-5) and not torch.allclose(unmasked[1], batched[1])


# ---------------------------------------------------------------- (b) export, (c) import
EXPORTS = {  # name → preset overrides
    "llama-untied": ("tiny-llama3", dict(tie_embeddings=False)),
    "llama-tied": ("tiny-llama3", dict(tie_embeddings=True)),
    "qwen3": ("tiny-qwen3", {}),
    "qwen2": ("tiny-qwen2", {}),
    "mistral": ("tiny-mistral", {}),
    "gemma2": ("tiny-gemma2", {}),
    "gemma3": ("tiny-gemma3", {}),
    "deepseek_v3": ("tiny-deepseek_v3", {}),  # its MTP module has no place in a reward model
}


def _hf_scores(path: Path, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(path, attn_implementation="eager").eval()
    assert hf.config.num_labels == 1
    assert type(hf).__name__ == json.loads((path / "config.json").read_text())["architectures"][0]
    with torch.no_grad():
        return hf(input_ids=tokens, attention_mask=mask).logits.squeeze(-1).float()  # (B,)


@needs_transformers
@pytest.mark.parametrize("name", list(EXPORTS))
def test_export_matches_transformers_sequence_classification(name: str, tmp_path: Path) -> None:
    preset, overrides = EXPORTS[name]
    cfg = get_preset(preset, init_std=0.1, **overrides)
    ours = _random_reward_model(cfg)
    save_hf_reward_dir(cfg, ours.state_dict(), tmp_path / "hf", pad_token_id=PAD)
    hf_config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert hf_config["architectures"][0].endswith("ForSequenceClassification")
    assert hf_config["pad_token_id"] == PAD and "lm_head.weight" not in ours.state_dict()

    tokens, mask = _right_padded(cfg.vocab_size, [SEQ_LEN, 9, 31])
    with torch.no_grad():
        expected = ours(tokens, attention_mask=mask)
    assert expected.std() > 0.1, "rewards too alike for the comparison to mean anything"
    theirs = _hf_scores(tmp_path / "hf", tokens, mask)
    assert (theirs - expected).abs().max().item() <= ATOL

    cfg_back, sd_back = load_hf_reward_dir(tmp_path / "hf")  # and back: the same weights
    assert cfg_back == ours.cfg
    assert sd_back.keys() == ours.state_dict().keys()
    assert all(torch.equal(sd_back[k], v) for k, v in ours.state_dict().items())


@needs_transformers
def test_hf_sequence_classifier_imports_as_reward_checkpoint(tmp_path: Path) -> None:
    """A transformers-made Qwen3ForSequenceClassification → our checkpoint (CLI) → the same rewards."""
    from utils.convert_hf import main

    cfg = transformers.Qwen3Config(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=32, num_labels=1,
                                   pad_token_id=PAD, initializer_range=0.1, max_position_embeddings=128)
    torch.manual_seed(0)
    ref = transformers.AutoModelForSequenceClassification.from_config(cfg, attn_implementation="eager").eval()
    ref.save_pretrained(tmp_path / "hf")
    tokens, mask = _right_padded(96, [SEQ_LEN, 5, 17])
    with torch.no_grad():
        theirs = ref(input_ids=tokens, attention_mask=mask).logits.squeeze(-1)

    main(["--hf_dir", str(tmp_path / "hf"), "--out", str(tmp_path / "ckpt")])
    ckpt = load_checkpoint(tmp_path / "ckpt")
    assert ckpt.task == REWARD_MODEL
    ours = RewardModel(ModelConfig(**ckpt.model_config))
    ours.load_state_dict(ckpt.state_dict, strict=True)
    with torch.no_grad():
        assert (ours.eval()(tokens, attention_mask=mask) - theirs).abs().max().item() <= ATOL

    main(["--checkpoint", str(tmp_path / "ckpt"), "--to_hf", str(tmp_path / "back")])  # and out again
    assert json.loads((tmp_path / "back" / "config.json").read_text())["pad_token_id"] == PAD
    assert (_hf_scores(tmp_path / "back", tokens, mask) - theirs).abs().max().item() <= ATOL


def test_policy_and_reward_directories_do_not_pass_as_each_other(tmp_path: Path) -> None:
    cfg = get_preset("tiny-llama3")
    save_hf_reward_dir(cfg, _random_reward_model(cfg).state_dict(), tmp_path / "rm", pad_token_id=PAD)
    save_hf_dir(cfg, build_model(cfg).state_dict(), tmp_path / "lm")
    with pytest.raises(HFFormatError, match="is a reward model"):
        load_hf_dir(tmp_path / "rm")
    with pytest.raises(HFFormatError, match="is a causal language model"):
        load_hf_reward_dir(tmp_path / "lm")
    hf = json.loads((tmp_path / "rm" / "config.json").read_text())  # no architectures: the weights decide
    del hf["architectures"]
    (tmp_path / "rm" / "config.json").write_text(json.dumps(hf))
    with pytest.raises(HFFormatError, match="reward head"):
        load_hf_dir(tmp_path / "rm")


# ---------------------------------------------------------------- (d) align/score.py
@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """A tokenizer, a reward-model checkpoint, a policy checkpoint and the reward model's HF export."""
    from utils.convert_hf import checkpoint_to_hf

    root = tmp_path_factory.mktemp("rm")
    tok = make_tokenizer(root / "tokenizer")
    cfg = get_preset("tiny-llama3", vocab_size=TOK_VOCAB, init_std=0.1, max_seq_len=64)
    save_checkpoint(root / "rm", _random_reward_model(cfg).state_dict(),
                    {**cfg.model_dump(mode="json"), "task": REWARD_MODEL}, tokenizer_dir=tok)
    save_checkpoint(root / "policy", build_model(cfg).state_dict(), cfg.model_dump(mode="json"), tokenizer_dir=tok)
    checkpoint_to_hf(root / "rm", root / "rm_hf")
    return {"tokenizer": tok, "rm": root / "rm", "policy": root / "policy", "rm_hf": root / "rm_hf"}


PROMPT, RESPONSE = "Tell me a story about a cat.", "Once upon a time, a little cat found a red ball."


def test_scores_equal_the_model_on_the_preference_encoding(checkpoints: dict[str, Path]) -> None:
    from align.score import encode_scored, load_reward_model, score, score_batch

    model, ct = load_reward_model(checkpoints["rm"], "cpu")
    assert isinstance(ct, ChatTokenizer)
    messages = [{"role": "user", "content": PROMPT}]
    long_reply = " ".join(["and then the cat ran"] * 40)  # cut to max_seq_len, keeping <|im_end|>
    for reply in (RESPONSE, long_reply):
        (prompt_ids, chosen, _), _ = encode_pair(ct, (messages, reply, "no"), model.cfg.max_seq_len)
        assert sum(encode_scored(ct, PROMPT, reply, model.cfg.max_seq_len), []) == prompt_ids + chosen
        with torch.no_grad():
            direct = model(torch.tensor([prompt_ids + chosen])).item()
        assert score(model, ct, PROMPT, reply) == pytest.approx(direct, abs=1e-5)
    batch = score_batch(model, ct, [PROMPT, PROMPT, "Hi"], [RESPONSE, long_reply, "Hello!"], batch_size=2)
    assert batch == pytest.approx([score(model, ct, p, r) for p, r in
                                   [(PROMPT, RESPONSE), (PROMPT, long_reply), ("Hi", "Hello!")]], abs=1e-5)


def test_score_cli_prints_the_reward(checkpoints: dict[str, Path]) -> None:
    from align.score import load_reward_model, score

    model, ct = load_reward_model(checkpoints["rm"], "cpu")
    expected = score(model, ct, PROMPT, RESPONSE)
    proc = run_script(["align/score.py", "--checkpoint", str(checkpoints["rm"]), "--prompt", PROMPT,
                       "--response", RESPONSE, "--device", "cpu"])
    assert proc.returncode == 0, proc.stderr
    assert float(proc.stdout.strip()) == pytest.approx(expected, abs=1e-5)
    proc = run_script(["align/score.py", "--checkpoint", str(checkpoints["rm_hf"]), "--prompt", PROMPT,
                       "--response", RESPONSE, "--device", "cpu", "--json"])  # the HF export scores the same
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["reward"] == pytest.approx(expected, abs=1e-5) and result["truncated"] is False


# ---------------------------------------------------------------- (e) refusals
def test_score_refuses_a_policy_checkpoint(checkpoints: dict[str, Path]) -> None:
    proc = run_script(["align/score.py", "--checkpoint", str(checkpoints["policy"]), "--prompt", PROMPT,
                       "--response", RESPONSE, "--device", "cpu"])
    assert_user_error(proc, "is a causal language model, not a reward model "
                            "(train one with align/train_reward_model.py)")


def test_generate_refuses_a_reward_model(checkpoints: dict[str, Path]) -> None:
    proc = run_script(["inference/generate.py", "--checkpoint", str(checkpoints["rm"]), "--prompt", "Once",
                       "--device", "cpu"])
    assert_user_error(proc, "is a reward model (config.json task=reward_model): it scores text, it does not "
                            "generate; use align/score.py")


def test_loaders_refuse_the_other_kind_in_process(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    from align.score import load_reward_model
    from inference.engine.loading import load_model
    from utils.convert_hf import checkpoint_to_hf

    with pytest.raises(UserError, match="it scores text, it does not generate"):
        load_model(checkpoints["rm_hf"], torch.device("cpu"), torch.float32)  # the HF export too
    checkpoint_to_hf(checkpoints["policy"], tmp_path / "policy_hf")
    with pytest.raises(UserError, match="is a causal language model"):
        load_reward_model(tmp_path / "policy_hf", "cpu")
    with pytest.raises(UserError, match="checkpoint not found"):
        load_reward_model(tmp_path / "missing", "cpu")
    bare = tmp_path / "bare"  # the reward model without its tokenizer
    save_checkpoint(bare, load_checkpoint(checkpoints["rm"]).state_dict,
                    json.loads((checkpoints["rm"] / "config.json").read_text()))
    with pytest.raises(UserError, match="no tokenizer.json"):
        load_reward_model(bare, "cpu")
    with pytest.raises(UserError, match="without a pad token id"):
        checkpoint_to_hf(bare, tmp_path / "bare_hf")
