"""Supervised fine-tuning (`finetune/`): packing, the model-config merge, full SFT, LoRA, QLoRA,
long context, Hugging Face bases, and a chat that follows the template.

The data is the project's built-in instruction data encoded with a small byte-level BPE
trained in a fixture; the base is a tiny randomly initialised model saved as our checkpoint.
References: per-sample losses computed one sample at a time (packing), a plain model built
from the merged weights (LoRA merge), bitsandbytes' own 8-bit optimizer (QLoRA).
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from data_pipeline.builtin import generate_instructions
from data_pipeline.builtin.stories import generate_stories
from data_pipeline.chat import ChatTokenizer, encode_prompt
from data_pipeline.chat_loaders import SFTLoader
from data_pipeline.formats import CHAT_TEMPLATE, SPECIAL_TOKENS
from data_pipeline.processing import build_sft_bins
from data_pipeline.tokenizer.io import write_hf_configs
from finetune import sft
from finetune.base_model import BaseModelSource, build_sft_model
from finetune.config import SFTConfig, resolve_model_config
from model import ModelConfig, RopeScaling, build_model
from model.hf import save_hf_dir
from model.lora import LoraExperts, LoraLinear, lora_modules
from model.lora_io import load_adapter, read_adapter
from model.qlinear import NF4Linear
from trainer.evaluation import generate
from trainer.losses import causal_lm_loss, cross_entropy_sum
from utils.checkpoint import load_checkpoint, save_checkpoint
from utils.config import validate
from utils.errors import UserError

VOCAB = 1024
TINY = dict(vocab_size=VOCAB, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden_dim=172, max_seq_len=256)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models train several times faster on one thread on a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------------------- data and base
@dataclass
class SFTEnv:
    root: Path
    data_dir: Path
    base: Path  # a tiny random model saved as our checkpoint (with the tokenizer)


def make_tokenizer(out_dir: Path) -> Path:
    """Byte-level BPE (vocab 1024) on built-in stories, with the chat template beside it."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(generate_stories(200, seed=1), trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    write_hf_configs(out_dir)
    return out_dir


def make_base(path: Path, tokenizer_dir: Path, **overrides: Any) -> Path:
    cfg = ModelConfig(**{**TINY, **overrides})
    torch.manual_seed(0)
    save_checkpoint(path, build_model(cfg).state_dict(), cfg.model_dump(mode="json"), tokenizer_dir=tokenizer_dir)
    return path


def make_sft_env(root: Path) -> SFTEnv:
    """Tokenizer, SFT bins of the built-in instruction data (max 256 tokens) and a base checkpoint."""
    data = root / "data"
    make_tokenizer(data / "tokenizer")
    build_sft_bins.main(["--data_dir", str(data), "--num_instructions", "200", "--num_conversations", "40",
                         "--max_seq_len", "256", "--val_fraction", "0.15"])
    return SFTEnv(root, data, make_base(root / "base", data / "tokenizer"))


@pytest.fixture(scope="session")
def env(tmp_path_factory) -> SFTEnv:
    return make_sft_env(tmp_path_factory.mktemp("sft"))


def config_dict(env: SFTEnv, runs: Path, run_name: str, **sections: dict) -> dict:
    cfg: dict[str, Any] = {
        "data": {"data_dir": str(env.data_dir)},
        "training": {"batch_size": 4, "max_steps": 30, "learning_rate": 3e-3, "warmup_steps": 2, "weight_decay": 0.0,
                     "device": "cpu", "eval_interval": 15, "eval_steps": 2},
        "logging": {"runs_dir": str(runs), "run_name": run_name, "log_interval": 1},
        "checkpointing": {"init_from": str(env.base), "save_interval": 15, "keep_last": 2},
    }
    for name, values in sections.items():
        cfg.setdefault(name, {}).update(values)
    return cfg


def sft_config(env: SFTEnv, runs: Path, run_name: str, **sections: dict) -> SFTConfig:
    return validate(config_dict(env, runs, run_name, **sections), SFTConfig)


def losses_of(run: Path) -> list[float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


def assert_loss_falls(run: Path, by: float) -> None:
    losses = losses_of(run)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - by, (first, last)


def plain_model(ckpt_dir: Path) -> torch.nn.Module:
    """What inference loads: a plain `Transformer` from a checkpoint directory (strict)."""
    ckpt = load_checkpoint(ckpt_dir)
    model = build_model(ModelConfig(**ckpt.model_config))
    model.load_state_dict(ckpt.state_dict)
    return model.eval()


# ---------------------------------------------------------------------------- packing
@pytest.mark.parametrize("overrides", [{}, {"family": "qwen3", "qk_norm": True, "tie_embeddings": True}])
def test_packed_loss_equals_per_sample_losses(env: SFTEnv, overrides: dict) -> None:
    """Σ target CE / Σ targets of a packed batch == the same over each sample run alone."""
    cfg = ModelConfig(**{**TINY, "max_seq_len": 512, **overrides})
    torch.manual_seed(1)
    model = build_model(cfg).eval()
    batch = next(SFTLoader(env.data_dir / "sft" / "train", seq_len=512, batch_size=3, mode="packed", seed=3))
    assert (batch["doc_ids"].amax(dim=1) >= 1).all()  # every row really holds several samples
    with torch.no_grad():
        packed = causal_lm_loss(model, batch)
        total, count = 0.0, 0
        for r in range(batch["input_ids"].shape[0]):
            for d in range(int(batch["doc_ids"][r].max()) + 1):
                keep = batch["doc_ids"][r] == d
                ids, labels = batch["input_ids"][r, keep][None], batch["labels"][r, keep][None]  # (1, n)
                ce, n = cross_entropy_sum(model(ids), labels)
                total, count = total + ce.item(), count + n
        unmasked = causal_lm_loss(model, {"input_ids": batch["input_ids"], "labels": batch["labels"]})
    assert packed.n_tokens == count
    assert packed.loss_sum.item() / packed.n_tokens == pytest.approx(total / count, rel=1e-5)
    # the check can fail: without document masking and restarted positions the loss differs
    assert abs(unmasked.loss_sum.item() / unmasked.n_tokens - total / count) > 1e-3


def test_padded_loss_without_mask_equals_masked(env: SFTEnv) -> None:
    torch.manual_seed(1)
    model = build_model(ModelConfig(**TINY)).eval()
    batch = next(SFTLoader(env.data_dir / "sft" / "train", seq_len=256, batch_size=4, mode="padded", seed=3))
    with torch.no_grad():
        fast, masked = sft.sft_loss(packed=False)(model, batch), sft.sft_loss(packed=True)(model, batch)
    assert fast.n_tokens == masked.n_tokens > 0
    assert fast.loss_sum.item() == pytest.approx(masked.loss_sum.item(), rel=1e-5)


# ---------------------------------------------------------------------------- model config merge
def test_model_config_merge_rules() -> None:
    base = ModelConfig(**{**TINY, "max_seq_len": 128, "rope_theta": 500000.0})
    same = resolve_model_config(base, ModelConfig(), "base")
    assert same == base  # nothing written: the base's config, not ModelConfig's defaults
    restated = ModelConfig(**{**TINY, "max_seq_len": 512, "rope_theta": 500000, "dropout": 0.1,
                              "rope_scaling": {"type": "yarn", "factor": 4.0}})
    out = resolve_model_config(base, restated, "base")
    assert (out.max_seq_len, out.dropout, out.dim) == (512, 0.1, 64)
    assert out.rope_scaling == RopeScaling(type="yarn", factor=4.0, original_max_position_embeddings=128)
    with pytest.raises(UserError, match=r"model.dim=128 conflicts with the base model's 64"):
        resolve_model_config(base, ModelConfig(dim=128, n_heads=4), "base")
    with pytest.raises(UserError, match="rope_theta"):
        resolve_model_config(base, ModelConfig(rope_theta=10000.0), "base")
    scaled = base.model_copy(update={"rope_scaling": RopeScaling(type="llama3", factor=8.0,
                                                                 original_max_position_embeddings=64)})
    out = resolve_model_config(scaled, ModelConfig(rope_scaling={"type": "yarn", "factor": 16.0}), "base")
    assert out.rope_scaling.original_max_position_embeddings == 64  # the length the base was trained at


def test_config_section_errors(env: SFTEnv, tmp_path: Path) -> None:
    data = config_dict(env, tmp_path, "x")
    del data["checkpointing"]["init_from"]
    with pytest.raises(UserError, match="checkpointing.init_from"):
        validate(data, SFTConfig)
    with pytest.raises(UserError, match="lora.rank"):
        validate(config_dict(env, tmp_path, "x", lora={"rank": 4}), SFTConfig)
    with pytest.raises(UserError, match="sft_lora_train.py"):
        sft.prepare(sft_config(env, tmp_path, "x", lora={"r": 4}), "full")
    with pytest.raises(UserError, match="training.optimizer"):
        validate(config_dict(env, tmp_path, "x", qlora={"optimizer": "adamw8bit"}, training={"optimizer": "muon"}),
                 SFTConfig)
    with pytest.raises(UserError, match="conflicts with the base"):
        sft.prepare(sft_config(env, tmp_path, "x", model={"n_layers": 3}), "full")
    with pytest.raises(UserError, match="model.max_seq_len"):
        sft.train(sft_config(env, tmp_path, "x", data={"seq_len": 512}), "full")
    assert not (tmp_path / "sft").exists()  # checked before the run directory is made


# ---------------------------------------------------------------------------- full SFT
def test_full_sft_loss_falls_and_checkpoint_is_complete(env: SFTEnv, tmp_path: Path) -> None:
    summary = sft.train(sft_config(env, tmp_path, "full"), "full")
    run = tmp_path / "sft" / "full"
    assert_loss_falls(run, by=0.5)
    final = summary["final_checkpoint"]
    assert final == run / "checkpoints" / "final"
    assert json.loads((final / "tokenizer_config.json").read_text())["chat_template"] == CHAT_TEMPLATE
    assert (final / "tokenizer.json").is_file()
    assert json.loads((final / "meta.json").read_text())["stage"] == "sft"
    base = load_checkpoint(env.base)
    assert load_checkpoint(final).model_config == base.model_config
    plain_model(final)  # loads strictly as a plain model


@pytest.mark.slow
def test_chat_reply_follows_the_template(env: SFTEnv, tmp_path: Path) -> None:
    """Full SFT on a few built-in word problems; greedy replies then end with <|im_end|>."""
    data = tmp_path / "data"
    shutil.copytree(env.data_dir / "tokenizer", data / "tokenizer")
    records = [r for r in generate_instructions(200, seed=0) if "The answer is" in r["output"]][:6]
    (tmp_path / "problems.json").write_text(json.dumps(records))
    build_sft_bins.main(["--data_dir", str(data), "--input", str(tmp_path / "problems.json"),
                         "--val_fraction", "0.01", "--max_seq_len", "128"])
    cfg = sft_config(env, tmp_path / "runs", "chat", data={"data_dir": str(data)},
                     training={"batch_size": 1, "max_steps": 120, "warmup_steps": 5, "eval_interval": 1000},
                     checkpointing={"save_interval": 1000}, logging={"log_interval": 20})
    final = sft.train(cfg, "full")["final_checkpoint"]
    model = plain_model(final)
    ct = ChatTokenizer.wrap(Tokenizer.from_file(str(final / "tokenizer.json")))
    for record in records:
        prompt = encode_prompt(ct, [{"role": "user", "content": record["instruction"]}])
        reply = generate(model, prompt, max_new_tokens=60, stop_ids={ct.im_end_id})
        assert reply[-1] == ct.im_end_id, ct.tok.decode(reply, skip_special_tokens=False)
        assert ct.tok.decode(reply[:-1]).strip()  # some text before the end of the turn


# ---------------------------------------------------------------------------- LoRA
LORA_TARGETS = ["q_proj", "v_proj", "down_proj", "lm_head"]


def test_lora_trains_only_adapters_saves_them_and_merges(env: SFTEnv, tmp_path: Path) -> None:
    cfg = sft_config(env, tmp_path, "lora", lora={"r": 8, "target_modules": LORA_TARGETS, "merge_and_save": True},
                     training={"learning_rate": 2e-2})
    final = sft.train(cfg, "lora")["final_checkpoint"]
    run = tmp_path / "sft" / "lora"
    assert_loss_falls(run, by=0.5)
    base = load_checkpoint(env.base).state_dict
    for step_dir in (run / "checkpoints" / "step_00000015", run / "checkpoints" / "step_00000030", final):
        config, tensors = read_adapter(step_dir)  # PEFT layout: adapter_model.safetensors + adapter_config.json
        assert config.r == 8 and all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in tensors)
    raw = json.loads((final / "adapter_config.json").read_text())
    assert raw["peft_type"] == "LORA" and raw["base_model_name_or_path"] == str(env.base)
    assert sorted(raw["target_modules"]) == sorted(
        [f"layers.{i}.attn.{m}" for i in range(2) for m in ("q_proj", "v_proj")]
        + [f"layers.{i}.ffn.down_proj" for i in range(2)] + ["lm_head"])
    # the frozen base did not move: the resumable checkpoint holds it unchanged
    state = load_file(str(run / "checkpoints" / "step_00000030" / "model.safetensors"))
    assert torch.equal(state["layers.0.attn.q_proj.base_layer.weight"], base["layers.0.attn.q_proj.weight"])
    assert torch.equal(state["layers.0.attn.k_proj.weight"], base["layers.0.attn.k_proj.weight"])
    assert torch.equal(state["embed.weight"], base["embed.weight"])
    # merged plain checkpoint == base + adapters, computed by the LoRA modules themselves
    merged = plain_model(final)
    adapted = load_adapter(plain_model(env.base), final)
    tokens = torch.randint(0, VOCAB, (2, 32))
    with torch.no_grad():
        assert torch.allclose(merged(tokens), adapted(tokens), atol=1e-5)
        assert not torch.allclose(merged(tokens), plain_model(env.base)(tokens), atol=1e-3)


@pytest.mark.parametrize("lora, expected", [
    ({"target_modules": "auto"}, {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}),
    ({"target_regex": r"layers\.1\.attn\.(q|k)_proj"}, {"q_proj", "k_proj"}),
    ({"target_modules": ["o_proj"]}, {"o_proj"}),
])
def test_lora_targets(env: SFTEnv, tmp_path: Path, lora: dict, expected: set) -> None:
    cfg = sft_config(env, tmp_path, "t", lora=lora)
    source = sft.prepare(cfg, "lora")
    model = build_sft_model(source, cfg, "lora", torch.device("cpu"), torch.float32)
    paths = [p for p, _ in lora_modules(model)]
    assert {p.rsplit(".", 1)[-1] for p in paths} == expected
    if "target_regex" in lora:
        assert all(p.startswith("layers.1.") for p in paths)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)


def test_lora_target_error_names_the_leaves(env: SFTEnv, tmp_path: Path) -> None:
    cfg = sft_config(env, tmp_path, "t", lora={"target_modules": ["qproj"]})
    source = sft.prepare(cfg, "lora")
    with pytest.raises(UserError, match="qproj.*q_proj"):
        build_sft_model(source, cfg, "lora", torch.device("cpu"), torch.float32)


def test_lora_resume_is_exact(env: SFTEnv, tmp_path: Path) -> None:
    sections = dict(lora={"r": 4, "target_modules": LORA_TARGETS},
                    training={"max_steps": 6, "learning_rate": 1e-2, "eval_interval": 3},
                    checkpointing={"save_interval": 3})
    sft.train(sft_config(env, tmp_path, "straight", **sections), "lora")
    sft.train(sft_config(env, tmp_path, "pieces", **sections), "lora", stop_at=3)
    sft.train(sft_config(env, tmp_path, "pieces", **sections), "lora", resume="auto")
    a, b = (read_adapter(tmp_path / "sft" / name / "checkpoints" / "final")[1] for name in ("straight", "pieces"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert losses_of(tmp_path / "sft" / "straight") == losses_of(tmp_path / "sft" / "pieces")


def test_lora_checkpoint_is_refused_as_a_base(env: SFTEnv, tmp_path: Path) -> None:
    sections = dict(lora={"r": 2}, training={"max_steps": 1}, checkpointing={"save_interval": 1})
    sft.train(sft_config(env, tmp_path, "a", **sections), "lora")
    step = tmp_path / "sft" / "a" / "checkpoints" / "step_00000001"
    with pytest.raises(UserError, match="LoRA/QLoRA training checkpoint"):
        BaseModelSource.open(step)
    with pytest.raises(UserError, match="adapters only"):
        BaseModelSource.open(tmp_path / "sft" / "a" / "checkpoints" / "final")


# ---------------------------------------------------------------------------- QLoRA
def test_qlora_nf4_base_loss_falls(env: SFTEnv, tmp_path: Path) -> None:
    cfg = sft_config(env, tmp_path, "qlora", lora={"r": 8, "target_modules": LORA_TARGETS},
                     qlora={"backend": "torch", "quantize_head": True}, training={"learning_rate": 2e-2})
    source = sft.prepare(cfg, "qlora")
    model = build_sft_model(source, cfg, "qlora", torch.device("cpu"), torch.float32)
    bases = {p: type(m.base_layer) for p, m in lora_modules(model)}
    assert bases["lm_head"] is NF4Linear and bases["layers.0.attn.q_proj"] is NF4Linear
    assert isinstance(model.get_submodule("layers.0.attn.k_proj"), NF4Linear)  # quantised, not adapted
    sft.train(cfg, "qlora")
    assert_loss_falls(tmp_path / "sft" / "qlora", by=0.5)
    _, tensors = read_adapter(tmp_path / "sft" / "qlora" / "checkpoints" / "final")
    assert "lm_head.lora_B.weight" in tensors


def test_qlora_keeps_head_unless_asked_and_checks_skip_names(env: SFTEnv, tmp_path: Path) -> None:
    cfg = sft_config(env, tmp_path, "q", qlora={"skip_modules": ["layers.1"]})
    source = sft.prepare(cfg, "qlora")
    model = build_sft_model(source, cfg, "qlora", torch.device("cpu"), torch.float32)
    assert isinstance(model.lm_head, torch.nn.Linear)
    assert isinstance(model.get_submodule("layers.0.attn.q_proj").base_layer, NF4Linear)
    assert isinstance(model.get_submodule("layers.1.attn.q_proj").base_layer, torch.nn.Linear)
    cfg = sft_config(env, tmp_path, "q", qlora={"skip_modules": ["layer.1"]})
    with pytest.raises(UserError, match="skip_modules entry 'layer.1'"):
        build_sft_model(sft.prepare(cfg, "qlora"), cfg, "qlora", torch.device("cpu"), torch.float32)


def test_qlora_bnb_backend_and_8bit_optimizer_on_cpu(env: SFTEnv, tmp_path: Path) -> None:
    """bitsandbytes' 4-bit matmul and AdamW8bit run on CPU; the 8-bit optimizer states (tensors
    of 4096+ elements) resume exactly."""
    bnb_optim = pytest.importorskip("bitsandbytes.optim")
    from finetune.peft.adapters import optimizer_factory

    sections = dict(lora={"r": 64, "target_modules": ["gate_proj"]}, qlora={"backend": "bnb", "optimizer": "adamw8bit"},
                    training={"max_steps": 2, "learning_rate": 1e-2, "eval_interval": 1},
                    checkpointing={"save_interval": 1})
    cfg = sft_config(env, tmp_path, "a", **sections)
    model = build_sft_model(sft.prepare(cfg, "qlora"), cfg, "qlora", torch.device("cpu"), torch.float32)
    assert isinstance(optimizer_factory(cfg)(model), bnb_optim.AdamW8bit)
    assert model.get_submodule("layers.0.attn.q_proj").backend == "bnb"
    sft.train(cfg, "qlora")
    sft.train(sft_config(env, tmp_path, "b", **sections), "qlora", stop_at=1)
    sft.train(sft_config(env, tmp_path, "b", **sections), "qlora", resume="auto")
    a, b = (read_adapter(tmp_path / "sft" / name / "checkpoints" / "final")[1] for name in ("a", "b"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(t.abs().sum() > 0 for k, t in a.items() if "lora_B" in k)  # and the adapters did train


@pytest.mark.filterwarnings("ignore:Paged optimizers are not supported on CPU")
def test_paged_8bit_optimizer_builds_and_steps(env: SFTEnv, tmp_path: Path) -> None:
    bnb_optim = pytest.importorskip("bitsandbytes.optim")
    from finetune.peft.adapters import optimizer_factory

    cfg = sft_config(env, tmp_path, "p", lora={"r": 64, "target_modules": ["gate_proj"]},
                     qlora={"backend": "torch", "optimizer": "paged_adamw8bit"})
    model = build_sft_model(sft.prepare(cfg, "qlora"), cfg, "qlora", torch.device("cpu"), torch.float32)
    opt = optimizer_factory(cfg)(model)
    assert isinstance(opt, bnb_optim.PagedAdamW8bit) and all("base_lr" in g for g in opt.param_groups)
    batch = next(SFTLoader(env.data_dir / "sft" / "train", seq_len=256, batch_size=2))
    out = causal_lm_loss(model, batch)
    (out.loss_sum / out.n_tokens).backward()
    opt.step()
    assert any(p.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)


def test_8bit_optimizer_without_bitsandbytes_is_a_clear_error(env: SFTEnv, tmp_path: Path, monkeypatch) -> None:
    import sys

    from finetune.peft.adapters import optimizer_factory

    monkeypatch.setitem(sys.modules, "bitsandbytes.optim", None)  # import fails as if not installed
    cfg = sft_config(env, tmp_path, "x", qlora={"optimizer": "adamw8bit"})
    model = torch.nn.Linear(4, 4)
    with pytest.raises(UserError, match="needs the bitsandbytes package"):
        optimizer_factory(cfg)(model)


# ---------------------------------------------------------------------------- long context, HF bases
def test_long_context_sft_with_yarn(env: SFTEnv, tmp_path: Path) -> None:
    short_base = make_base(tmp_path / "base128", env.data_dir / "tokenizer", max_seq_len=128)
    cfg = sft_config(env, tmp_path, "long", model={"max_seq_len": 512, "rope_scaling": {"type": "yarn", "factor": 4.0}},
                     data={"seq_len": 512}, training={"max_steps": 2, "batch_size": 2},
                     checkpointing={"init_from": str(short_base), "save_interval": 2})
    summary = sft.train(cfg, "full")
    saved = load_checkpoint(summary["final_checkpoint"]).model_config
    assert saved["max_seq_len"] == 512
    assert saved["rope_scaling"]["type"] == "yarn" and saved["rope_scaling"]["original_max_position_embeddings"] == 128
    train, _, seq_len = sft.build_sft_loaders(cfg, 0, 1, None)
    batch = next(train)
    assert seq_len == 512 and batch["input_ids"].shape == (2, 512)
    assert batch["position_ids"].max() < 256 < int(batch["attention_mask"][0].sum())  # several samples per long row
    # LoRA adapters alone cannot carry the new context settings: final/meta.json records them
    cfg = sft_config(env, tmp_path, "long_lora", data={"seq_len": 512}, lora={"r": 2},
                     model={"max_seq_len": 512, "rope_scaling": {"type": "linear", "factor": 4.0}},
                     training={"max_steps": 1, "batch_size": 2},
                     checkpointing={"init_from": str(short_base), "save_interval": 1})
    final = sft.train(cfg, "lora")["final_checkpoint"]
    overrides = json.loads((final / "meta.json").read_text())["adapter"]["model_overrides"]
    assert overrides["max_seq_len"] == 512 and overrides["rope_scaling"]["type"] == "linear"


def test_start_from_a_hugging_face_directory(env: SFTEnv, tmp_path: Path) -> None:
    ckpt = load_checkpoint(env.base)
    hf_dir = save_hf_dir(ModelConfig(**ckpt.model_config), ckpt.state_dict, tmp_path / "hf")
    source = BaseModelSource.open(hf_dir)
    assert source.kind == "huggingface" and source.config.dim == TINY["dim"]
    cfg = sft_config(env, tmp_path, "hf", training={"max_steps": 2}, checkpointing={"init_from": str(hf_dir)})
    model = build_sft_model(sft.prepare(cfg, "full"), cfg, "full", torch.device("cpu"), torch.float32)
    for name, t in model.state_dict().items():
        assert torch.equal(t, ckpt.state_dict[name]), name
    summary = sft.train(cfg, "full")
    assert summary["step"] == 2 and (summary["final_checkpoint"] / "tokenizer.json").is_file()


def test_moe_base_gets_expert_adapters(env: SFTEnv, tmp_path: Path) -> None:
    moe_base = make_base(tmp_path / "moe", env.data_dir / "tokenizer", n_kv_heads=None,
                         moe={"n_routed_experts": 4, "num_experts_per_tok": 2, "moe_ffn_hidden_dim": 32})
    cfg = sft_config(env, tmp_path, "moe", lora={"r": 4}, qlora={"backend": "torch"},
                     checkpointing={"init_from": str(moe_base)}, training={"max_steps": 2})
    model = build_sft_model(sft.prepare(cfg, "qlora"), cfg, "qlora", torch.device("cpu"), torch.float32)
    kinds = {type(m) for _, m in lora_modules(model)}
    assert kinds == {LoraLinear, LoraExperts}
    assert sft.train(cfg, "qlora")["step"] == 2
