"""Weight-only int8 inference (`model/int8.py`, `LLMEngine(quantize="int8")`, ``--quantize int8``)
and the fused projections every engine-loaded model gets (`inference/engine/optimize.py`)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import assert_user_error, run_script
from engine_fixtures import save_model
from model import build_model, get_preset
from inference.engine.optimize import TransposedLinear
from model.int8 import Int8Linear, quantize_int8
from serving_fixtures import STORIES, make_tokenizer
from utils.paths import REPO_ROOT

TRAINED = REPO_ROOT / "runs" / "pretrain" / "demo" / "checkpoints" / "final"
PROMPTS = ["Once upon a time", "The little dog", "One day, Lily", "Tom and his mom", "The sun was",
           "A big bird", "She smiled and", "In the park", "The cat liked", "They played"]


def test_int8_linear_is_the_rowwise_absmax_quantization() -> None:
    torch.manual_seed(0)
    linear = torch.nn.Linear(32, 8, bias=True)
    q = Int8Linear(linear)
    w = linear.weight.detach()
    scale = w.abs().amax(dim=1) / 127  # one scale per output row
    assert torch.equal(q.weight_int8, torch.round(w / scale[:, None]).to(torch.int8))
    assert q.weight_int8.abs().max() == 127
    x = torch.randn(3, 5, 32)
    dequant = q.weight_int8.float() * q.scales.float()[:, None]
    expected = x.bfloat16().float() @ dequant.T + linear.bias.detach()
    assert torch.allclose(q(x), expected, rtol=2e-2, atol=2e-2)  # bf16 activations and output
    assert (q(x) - linear(x)).abs().max() < 0.05 * linear(x).abs().max()


def test_quantize_keeps_layers_the_kernel_cannot_take() -> None:
    model = quantize_int8(build_model(get_preset("tiny")))  # ffn hidden 172: not a multiple of 16
    assert isinstance(model.layers[0].attn.q_proj, Int8Linear)
    assert isinstance(model.layers[0].ffn.down_proj, torch.nn.Linear)


def test_load_time_rewrites_decode_as_before(tmp_path) -> None:
    from inference.engine.llm import LLM
    from inference.engine.sampling import SamplingParams

    ckpt = save_model(get_preset("tiny-qwen2", vocab_size=256), tmp_path / "m")
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    prompts = [[5, 6, 7, 8], [9, 10, 11]]
    fused = LLM(ckpt, device="cpu", dtype="fp32")
    plain = LLM(ckpt, device="cpu", dtype="fp32", optimize=False)
    assert fused.engine.model.layers[0].attn.qkv_proj is not None
    assert fused.engine.model.layers[0].ffn.gate_up_proj is not None
    assert isinstance(fused.engine.model.layers[0].attn.o_proj, TransposedLinear)
    assert plain.engine.model.layers[0].attn.qkv_proj is None
    assert [o.token_ids for o in fused.generate(prompts, params)] == [o.token_ids for o in plain.generate(prompts, params)]


def _train_tiny(directory: Path) -> Path:
    """A tiny Llama trained for a few hundred steps on the fixture stories (peaked predictions)."""
    from tokenizers import Tokenizer

    from utils.checkpoint import save_checkpoint

    tok_dir = make_tokenizer(directory.parent / "tok")
    tok = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    ids = torch.tensor([i for s in STORIES for i in tok.encode(s + "<|endoftext|>").ids])
    cfg = get_preset("tiny", vocab_size=tok.get_vocab_size(), ffn_hidden_dim=176)
    torch.manual_seed(0)
    model = build_model(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(300):
        starts = torch.randint(0, len(ids) - 65, (16,))
        batch = torch.stack([ids[s : s + 65] for s in starts.tolist()])
        logits = model(batch[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return save_checkpoint(directory, model.state_dict(), cfg.model_dump(), tokenizer_dir=tok_dir)


@pytest.mark.slow
def test_int8_top1_agrees_with_fp32_over_1000_greedy_tokens(tmp_path) -> None:
    from inference.engine.llm import LLM
    from inference.engine.sampling import SamplingParams

    ckpt = TRAINED if (TRAINED / "model.safetensors").is_file() else _train_tiny(tmp_path / "trained")
    fp32 = LLM(ckpt, device="cpu", dtype="fp32")
    int8 = LLM(ckpt, device="cpu", dtype="fp32", quantize="int8")
    assert any(isinstance(m, Int8Linear) for m in int8.engine.model.modules())
    n = 100
    outs = fp32.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
    agree = total = 0
    with torch.inference_mode():
        for out in outs:  # teacher-forced: int8's argmax after each prefix of fp32's greedy text
            seq = out.prompt_token_ids + out.token_ids
            logits = int8.engine.model(torch.tensor([seq[:-1]]))[0, len(out.prompt_token_ids) - 1 :]  # (n, V)
            agree += (logits.argmax(dim=-1) == torch.tensor(out.token_ids)).sum().item()
            total += len(out.token_ids)
    assert total == 1000
    assert agree / total >= 0.99, f"int8 top-1 agreement {agree / total:.3f}"


def test_quantize_refuses_a_family_without_the_kernel(tmp_path) -> None:
    tok_dir = make_tokenizer(tmp_path / "tok")
    ckpt = save_model(get_preset("tiny-deepseek_v3", vocab_size=320), tmp_path / "moe", tok_dir)
    proc = run_script(["inference/generate.py", "--checkpoint", str(ckpt), "--prompt", "Once", "--device", "cpu",
                       "--quantize", "int8"])
    assert_user_error(proc, "--quantize int8 does not cover deepseek_v3")
