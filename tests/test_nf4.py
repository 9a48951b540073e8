"""NF4 quantisation (QLoRA, Dettmers et al. 2023) against numbers by hand and against bitsandbytes.

bitsandbytes is the reference: on the same tensors our packed bytes, block absmax and
dequantised values must equal ``bitsandbytes.functional.quantize_4bit / dequantize_4bit``
(quant_type="nf4"), with and without double quantisation. bitsandbytes is imported lazily
(it prints a warning on import) and the tests that need it skip without it.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from model import build_model, get_preset
from model.nf4 import (
    NF4_CODE,
    dynamic_code,
    nf4_absmax,
    nf4_dequantize,
    nf4_quantize,
    pack_nibbles,
    quantize_blockwise,
    unpack_nibbles,
)
from model.qlinear import NF4Experts, NF4Linear, quantize_model, weight_bytes


@pytest.fixture(scope="module")
def bnbf():
    pytest.importorskip("bitsandbytes")
    import bitsandbytes.functional as functional

    return functional


def _weights(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Normal weights with whole zero blocks (and a zero tail) when there is room for them."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * 0.05
    flat = w.view(-1)
    if flat.numel() >= 256:
        flat[64:192] = 0.0  # two whole zero blocks
    if flat.numel() % 64:
        flat[-(flat.numel() % 64):] *= 3.0  # a partial last block with its own scale
    return w.to(dtype)


# ---------------------------------------------------------------------------- by hand
def test_nf4_by_hand() -> None:
    w = torch.tensor([1.0, -0.5, 0.1, 0.0, -2.0, 0.5])  # blocks of 4: absmax 1, then 2
    q = nf4_quantize(w, blocksize=4, double_quant=False)
    # block 1 (absmax 1): 1.0 -> 15, -0.5 -> 2 (-0.5251), 0.1 -> 8 (0.0796), 0.0 -> 7
    # block 2 (absmax 2): -1.0 -> 0, 0.25 -> 10 (0.2461)
    assert q.absmax.tolist() == [1.0, 2.0]
    assert q.packed.tolist() == [(15 << 4) | 2, (8 << 4) | 7, (0 << 4) | 10]
    expected = torch.tensor([1.0, NF4_CODE[2], NF4_CODE[8], 0.0, -2.0, 2 * NF4_CODE[10]])
    assert torch.equal(nf4_dequantize(q), expected)


def test_odd_count_pads_with_the_zero_code() -> None:
    assert pack_nibbles(torch.tensor([15, 2, 8])).tolist() == [(15 << 4) | 2, (8 << 4) | 7]
    assert unpack_nibbles(torch.tensor([242, 135], dtype=torch.uint8), 3).tolist() == [15, 2, 8]


def test_blockwise_rounds_to_nearest_code() -> None:
    code = torch.tensor([-1.0, 0.0, 0.5, 1.0])
    idx, absmax = quantize_blockwise(torch.tensor([4.0, 0.9, 1.1, -2.1, 0.0, 0.0]), code, blocksize=4)
    # block 1 scaled by 1/4: [1, .225, .275, -.525] -> [3, 1, 2, 2]; block 2 is all zero -> the zero code
    assert idx.tolist() == [3, 1, 2, 0, 1, 1] and absmax.tolist() == [4.0, 0.0]


def test_double_quant_by_hand() -> None:
    w = torch.cat([torch.full((64,), 0.5), torch.full((64,), 1.5)])  # absmax [0.5, 1.5], mean 1
    q = nf4_quantize(w, double_quant=True)
    assert q.absmax_offset.item() == 1.0 and q.absmax_scale.tolist() == [0.5]  # max |absmax - mean| = 0.5
    # (absmax - mean) / 0.5 = [-1, 1]: the nearest dynamic codes are the first (-0.99297) and the last (1.0)
    assert q.absmax.tolist() == [0, 255]
    assert q.nbytes == 64 + 2 + 4 + 4  # 128 nibbles, 2 one-byte scales, their fp32 scale and offset
    code = dynamic_code()
    assert torch.equal(nf4_absmax(q), torch.stack([code[0] * 0.5 + 1.0, torch.tensor(1.5)]))


# ---------------------------------------------------------------------------- bitsandbytes parity
def test_code_books_equal_bitsandbytes(bnbf) -> None:
    assert torch.equal(torch.tensor(NF4_CODE), bnbf.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(dynamic_code(), bnbf.create_dynamic_map())


SHAPES = [(64, 96), (48, 130), (3, 5), (1,)]  # whole blocks, partial last block, odd count, one value


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
def test_packed_bytes_and_values_equal_bitsandbytes(bnbf, shape, dtype) -> None:
    w = _weights(shape, dtype)
    packed, state = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=False, quant_type="nf4")
    q = nf4_quantize(w, blocksize=64, double_quant=False)
    assert torch.equal(q.packed, packed.view(-1))
    assert torch.equal(q.absmax, state.absmax)
    # dequantise the flat view: bitsandbytes 0.50's CPU kernel mis-scales (m, n) rows when n % 64 != 0
    state.shape = torch.Size([w.numel()])
    for out_dtype in (torch.float32, torch.bfloat16):
        state.dtype = out_dtype
        assert torch.equal(nf4_dequantize(q, out_dtype).view(-1), bnbf.dequantize_4bit(packed, state).view(-1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES[:3] + [(512, 96)])
def test_double_quant_equals_bitsandbytes(bnbf, shape, dtype) -> None:
    from model.nf4 import bnb_quant_state

    w = _weights(shape, dtype)
    packed, state = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    q = nf4_quantize(w, blocksize=64, double_quant=True)
    assert torch.equal(q.packed, packed.view(-1))
    assert torch.equal(q.absmax_offset, state.offset)
    assert torch.equal(q.absmax_scale, state.state2.absmax)
    _assert_8bit_codes_match(q.absmax, state.absmax, nf4_absmax_raw(w), q.absmax_offset, q.absmax_scale)
    # bitsandbytes' kernels on our stored bytes give our dequantised values exactly
    for out_dtype in (torch.float32, torch.bfloat16):
        theirs = bnbf.dequantize_4bit(q.packed.view(-1, 1), bnb_quant_state(q, out_dtype))
        assert torch.equal(nf4_dequantize(q, out_dtype).view(-1), theirs.view(-1))


def nf4_absmax_raw(w: torch.Tensor) -> torch.Tensor:
    return nf4_quantize(w, blocksize=64, double_quant=False).absmax


def _assert_8bit_codes_match(ours, theirs, absmax, offset, scale) -> None:
    """Codes equal, except where bitsandbytes' CPU table search missed the nearest code (a few in a
    thousand: near 0, where the dynamic code is densest, it can be off by a few codes of ~1e-6)."""
    code = dynamic_code()
    block_scale = scale.repeat_interleave(256)[: absmax.numel()]
    x = (absmax - offset) / block_scale.clamp(min=1e-38)  # normalised to [-1, 1]
    # where a whole group of scales equals its mean every code decodes to the same value: skip those
    diff = ((ours.long() != theirs.long()) & (block_scale > 0)).nonzero().view(-1)
    assert diff.numel() <= max(1, absmax.numel() // 100), f"{diff.numel()} of {absmax.numel()} codes differ"
    for i in diff.tolist():
        a, b = int(ours[i]), int(theirs[i])
        assert (x[i] - code[a]).abs() < (x[i] - code[b]).abs()  # ours is the nearer code
        assert (code[a] - code[b]).abs() < 0.02  # and theirs is close by


def test_double_quant_codes_on_a_large_layer(bnbf) -> None:
    """~16k block scales: bitsandbytes' CPU 8-bit codes and ours agree but for a handful."""
    w = _weights((1024, 1024), torch.float32, seed=3)
    _, state = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    q = nf4_quantize(w, blocksize=64, double_quant=True)
    _assert_8bit_codes_match(q.absmax, state.absmax, nf4_absmax_raw(w), q.absmax_offset, q.absmax_scale)


# ---------------------------------------------------------------------------- 4-bit layers
def _linear(seed: int = 0, bias: bool = True) -> nn.Linear:
    torch.manual_seed(seed)
    lin = nn.Linear(96, 80, bias=bias)
    nn.init.normal_(lin.weight, std=0.05)
    return lin


def test_nf4_linear_both_backends_equal_and_close_to_fp32(bnbf) -> None:
    lin = _linear()
    x = torch.randn(3, 7, 96, requires_grad=True)
    ref = lin(x)
    outs, grads = {}, {}
    for backend in ("torch", "bnb"):
        layer = NF4Linear.from_linear(lin, backend=backend)
        out = layer(x)
        (g,) = torch.autograd.grad(out.square().sum(), x)
        outs[backend], grads[backend] = out, g
        assert out.dtype == torch.float32 and not any(p.requires_grad for p in layer.parameters())
    assert torch.allclose(outs["torch"], outs["bnb"], atol=1e-6, rtol=0)
    assert torch.allclose(grads["torch"], grads["bnb"], atol=1e-5, rtol=0)
    err = (outs["torch"] - ref).norm() / ref.norm()
    assert 0 < err < 0.15, f"relative error {err:.3f}"  # 4-bit: close, not equal
    # the weight property is the dequantised matrix the layer multiplies by
    layer = NF4Linear.from_linear(lin, backend="torch")
    assert torch.allclose(layer(x), x @ layer.weight.t() + lin.bias, atol=1e-6)


def test_nf4_linear_bf16_compute(bnbf) -> None:
    lin = _linear(bias=False)
    x = torch.randn(5, 96)
    outs = {b: NF4Linear.from_linear(lin, compute_dtype=torch.bfloat16, backend=b)(x) for b in ("torch", "bnb")}
    assert outs["torch"].dtype == torch.float32  # returned in the input's dtype
    assert torch.allclose(outs["torch"], outs["bnb"], atol=2e-2, rtol=2e-2)
    fp32 = NF4Linear.from_linear(lin, backend="torch")(x)
    assert torch.allclose(outs["torch"], fp32, atol=3e-2, rtol=3e-2)


def test_casting_a_quantized_model_keeps_fp32_block_scales() -> None:
    layer = NF4Linear.from_linear(_linear(), double_quant=False)
    before = layer.qweight.absmax.clone()
    layer.to(torch.bfloat16)
    assert layer.qweight.absmax.dtype == torch.float32 and torch.equal(layer.qweight.absmax, before)
    assert layer.qweight.packed.dtype == torch.uint8 and layer.bias.dtype == torch.bfloat16


def test_quantize_model_and_weight_bytes() -> None:
    torch.manual_seed(0)
    cfg = get_preset("tiny-deepseek_v3", mtp_depth=0)
    model = build_model(cfg).eval()
    tokens = torch.randint(0, cfg.vocab_size, (2, 16))
    with torch.no_grad():
        ref = model(tokens)
    linear_fp16 = 2 * sum(p.numel() for n, p in model.named_parameters()
                          if p.dim() >= 2 and not n.startswith(("embed", "lm_head")) and ".gate.weight" not in n)
    quantize_model(model)
    assert model.lm_head.__class__ is nn.Linear and isinstance(model.layers[0].attn.kv_b_proj, NF4Linear)
    assert isinstance(model.layers[1].ffn.experts, NF4Experts)
    sizes = weight_bytes(model)
    assert sizes["nf4"] <= 0.3 * linear_fp16, (sizes, linear_fp16)
    assert sizes["total"] == sizes["nf4"] + sizes["other"] and sizes["lora"] == 0
    with torch.no_grad():
        out = model(tokens)
    assert (out - ref).norm() / ref.norm() < 0.15
