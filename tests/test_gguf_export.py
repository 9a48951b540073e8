"""GGUF export (`utils/convert_hf.py --to_gguf`, `model/gguf.py`).

- The file's structure read back with ``gguf``'s own reader: architecture keys, tensor names,
  shapes and types, the embedded tokenizer, the RoPE row permutation of the llama architecture.
- llama.cpp itself (through ``llama-cpp-python``, skipped when it is absent: see
  requirements-bench.txt) loads our export: its logits on a prompt equal ours (f32, within
  1e-3) and its greedy tokens equal our engine's, for Llama 3, Qwen2, Qwen3 and Mistral.
- Bad input: an unsupported family exits 2 naming the supported ones.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import assert_user_error, run_script
from engine_fixtures import save_model
from safetensors.torch import load_file

from model import get_preset
from serving_fixtures import make_tokenizer
from utils.convert_hf import main as convert_main

gguf = pytest.importorskip("gguf")

VOCAB = 320  # the fixture tokenizer's
PROMPT = "Once upon a time there was a little cat"
FAMILIES = ["tiny-llama3", "tiny-qwen2", "tiny-qwen3", "tiny-mistral"]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    return make_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer")


def _checkpoint(tmp: Path, tok_dir: Path, preset: str, **overrides) -> Path:
    return save_model(get_preset(preset, vocab_size=VOCAB, **overrides), tmp / preset, tok_dir)


def _export(ckpt: Path, out: Path, outtype: str = "f32") -> Path:
    convert_main(["--checkpoint", str(ckpt), "--to_gguf", str(out), "--outtype", outtype])
    return out


def _field(reader, key: str):
    return reader.fields[key].contents()


def test_gguf_structure_llama(tmp_path, tok_dir) -> None:
    ckpt = _checkpoint(tmp_path, tok_dir, "tiny-llama3")
    reader = gguf.GGUFReader(_export(ckpt, tmp_path / "m.gguf"))
    cfg = get_preset("tiny-llama3", vocab_size=VOCAB)
    assert _field(reader, "general.architecture") == "llama"
    assert _field(reader, "llama.block_count") == cfg.n_layers
    assert _field(reader, "llama.attention.head_count_kv") == cfg.kv_heads
    assert _field(reader, "llama.rope.freq_base") == pytest.approx(cfg.rope_theta)
    assert _field(reader, "tokenizer.ggml.model") == "gpt2"
    assert _field(reader, "tokenizer.ggml.pre") == "gpt-2"
    tokens = _field(reader, "tokenizer.ggml.tokens")
    tok = json.loads((tok_dir / "tokenizer.json").read_text())
    assert len(tokens) == VOCAB and tokens[0] == "<|endoftext|>" and tokens[tok["model"]["vocab"]["Ġt"]] == "Ġt"
    assert _field(reader, "tokenizer.ggml.token_type")[:5] == [3, 3, 3, 3, 1]  # specials are control tokens
    assert _field(reader, "tokenizer.ggml.merges")[0] == " ".join(tok["model"]["merges"][0])
    assert _field(reader, "tokenizer.ggml.eos_token_id") == 0
    assert "<|im_start|>" in _field(reader, "tokenizer.chat_template")

    tensors = {t.name: t for t in reader.tensors}
    per_layer = {"attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down"}
    expected = {"token_embd.weight", "output_norm.weight", "output.weight", "rope_freqs.weight"}
    expected |= {f"blk.{i}.{n}.weight" for i in range(cfg.n_layers) for n in per_layer}
    assert set(tensors) == expected
    sd = load_file(str(ckpt / "model.safetensors"))
    q = sd["layers.0.attn.q_proj.weight"]  # (H * hd, D), rotate-half rows per head
    hd = cfg.attn_head_dim
    got = torch.from_numpy(np.array(tensors["blk.0.attn_q.weight"].data)).reshape(q.shape)
    per_head = q.view(cfg.n_heads, hd, -1)
    interleaved = torch.stack([per_head[:, : hd // 2], per_head[:, hd // 2 :]], dim=2).reshape(q.shape)
    assert torch.equal(got, interleaved)  # (x0, x_{d/2}, x1, x_{d/2+1}, ...) per head
    assert torch.equal(torch.from_numpy(np.array(tensors["blk.1.ffn_up.weight"].data)),
                       sd["layers.1.ffn.up_proj.weight"])
    assert list(tensors["blk.0.ffn_down.weight"].shape) == [cfg.ffn_hidden_dim, cfg.dim]  # ggml order (in, out)


def test_gguf_structure_qwen3_q8_0(tmp_path, tok_dir) -> None:
    ckpt = _checkpoint(tmp_path, tok_dir, "tiny-qwen3", ffn_hidden_dim=192)
    reader = gguf.GGUFReader(_export(ckpt, tmp_path / "m.gguf", "q8_0"))
    cfg = get_preset("tiny-qwen3", vocab_size=VOCAB)
    assert _field(reader, "general.architecture") == "qwen3"
    assert _field(reader, "qwen3.attention.key_length") == cfg.attn_head_dim == 32
    tensors = {t.name: t for t in reader.tensors}
    assert "output.weight" not in tensors  # tied: llama.cpp reuses token_embd
    assert "blk.1.attn_k_norm.weight" in tensors
    Q8, F32 = gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.F32
    assert tensors["blk.0.attn_q.weight"].tensor_type == Q8
    assert tensors["blk.0.attn_norm.weight"].tensor_type == F32
    w = load_file(str(ckpt / "model.safetensors"))["layers.0.ffn.down_proj.weight"]
    t = tensors["blk.0.ffn_down.weight"]
    back = torch.from_numpy(gguf.quants.dequantize(np.array(t.data), Q8)).reshape(w.shape)
    assert (back - w).abs().max() <= w.abs().max() / 127  # int8 per block of 32 with its own scale


def test_unsupported_family_exits_2(tmp_path, tok_dir) -> None:
    ckpt = _checkpoint(tmp_path, tok_dir, "tiny-gemma2")
    proc = run_script(["utils/convert_hf.py", "--checkpoint", str(ckpt), "--to_gguf", str(tmp_path / "m.gguf")])
    line = assert_user_error(proc, "no GGUF export")
    assert "llama, mistral, qwen2, qwen3" in line
    assert not (tmp_path / "m.gguf").exists()


# ---------------------------------------------------------------- llama.cpp itself
def _llama_cpp(path: Path):
    llama_cpp = pytest.importorskip("llama_cpp")
    # f32 K/V cache (llama.cpp's default is f16) so that f32 logits can be compared at 1e-3
    return llama_cpp.Llama(model_path=str(path), n_ctx=128, n_batch=128, n_threads=1, logits_all=True,
                           type_k=0, type_v=0, verbose=False)


@pytest.mark.parametrize("preset", FAMILIES)
def test_llama_cpp_logits_and_greedy_match_ours(tmp_path, tok_dir, preset) -> None:
    pytest.importorskip("llama_cpp")
    from inference.engine.llm import LLM
    from inference.engine.sampling import SamplingParams

    ckpt = _checkpoint(tmp_path, tok_dir, preset)
    ref = _llama_cpp(_export(ckpt, tmp_path / "m.gguf"))
    ours = LLM(ckpt, device="cpu", dtype="fp32")
    prompt = ours.tokenizer.encode(PROMPT, add_special_tokens=False).ids
    assert ref.tokenize(PROMPT.encode(), add_bos=False, special=True) == prompt  # the embedded tokenizer
    n = 24
    if preset == "tiny-mistral":  # llama.cpp's llama architecture has no sliding window: stay within ours (16)
        prompt, n = prompt[:8], 8

    ref.eval(prompt)
    theirs = torch.from_numpy(np.array(ref.scores[: len(prompt)]))  # (T, V)
    with torch.inference_mode():
        mine = ours.engine.model(torch.tensor([prompt]))[0].float()  # (T, V)
    assert (theirs - mine).abs().max().item() <= 1e-3

    out = ours.generate([prompt], SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))[0]
    ref.reset()
    ref.eval(prompt)
    greedy = []
    for _ in range(n):
        greedy.append(int(np.argmax(ref.scores[ref.n_tokens - 1])))
        ref.eval([greedy[-1]])
    assert out.token_ids == greedy
