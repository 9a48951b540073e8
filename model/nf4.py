"""4-bit NormalFloat (NF4) quantisation with double quantisation, as in QLoRA.

Follows QLoRA (Dettmers et al. 2023, §3) with the storage layout of ``bitsandbytes``, so that
our packed bytes and statistics are interchangeable with ``bitsandbytes.functional.
quantize_4bit(..., quant_type="nf4")``:

1. Block-wise absmax: the flattened weight is cut into blocks of ``blocksize`` (64) values;
   each block is divided by its largest magnitude, so it lies in [-1, 1].
2. Each scaled value becomes the index (0..15) of the nearest value of the NF4 code book: the
   16 quantiles of N(0, 1) normalised to [-1, 1], with an exact zero (QLoRA eq. 4, the values
   of the paper's appendix E, the table ``bitsandbytes`` uses).
3. Two indices share one byte: element 2i in the high nibble, element 2i + 1 in the low one;
   an odd count is padded with the index of 0.0.
4. Double quantisation (QLoRA §3 "Double Quantization"): the fp32 block absmaxes, minus their
   mean, are quantised again in blocks of 256 to 8 bits with the signed "dynamic" code of
   Dettmers 2016 ("8-Bit Approximations for Parallelism in Deep Learning"), keeping one fp32
   absmax per 256 blocks and the mean (the "offset"): 8.5 bits per 64 weights become
   ~8.1 + 32/256 bits, i.e. 4.127 bits per weight in all.

Rounding is to the nearest code value (ties to the lower one), as bitsandbytes' CUDA kernels and
its CPU 4-bit path do. Its CPU 8-bit kernel (used for the double quantisation on CPU) finds
neighbours with an approximate table search and, for a few values in a thousand, keeps the
second-nearest of two adjacent codes; those absmax codes then differ from ours by one step.

Everything here is a pure function on tensors. ``bitsandbytes`` is imported lazily, only by
`bnb_quant_state` / `bnb_dequantize`, which hand our tensors to its kernels.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

NF4_BLOCKSIZE = 64
ABSMAX_BLOCKSIZE = 256  # double quantisation of the absmax (fixed in bitsandbytes)

# The NF4 code book, ascending (QLoRA appendix E; identical to bitsandbytes' table).
NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
NF4_ZERO_INDEX = NF4_CODE.index(0.0)


def nf4_code(device: Optional[torch.device] = None) -> torch.Tensor:
    """The 16 NF4 values as an fp32 tensor (16,)."""
    return torch.tensor(NF4_CODE, dtype=torch.float32, device=device)


def dynamic_code(exponent_bits: int = 7, total_bits: int = 8) -> torch.Tensor:
    """Signed dynamic-tree 8-bit code (Dettmers 2016), ascending, fp32 (256,).

    For each exponent e = 0 .. exponent_bits - 1 the interval [0.1, 1] is cut into 2^e equal
    pieces; the piece midpoints times 10^(e - exponent_bits + 1), with both signs, are code
    values (2 * (2^exponent_bits - 1) = 254 of them); 0 and 1 complete the 256.
    """
    values: list[float] = [0.0, 1.0]
    for e in range(exponent_bits):
        edges = torch.linspace(0.1, 1.0, 2**e + 1, dtype=torch.float32)
        mids = (edges[:-1] + edges[1:]) / 2 * 10.0 ** (e - exponent_bits + 1)  # fp32 arithmetic
        values += mids.tolist() + (-mids).tolist()
    if len(values) != 2**total_bits:
        raise ValueError(f"a dynamic code with {exponent_bits} exponent bits has {len(values)} values, "
                         f"not 2^{total_bits}")
    return torch.tensor(sorted(values), dtype=torch.float32)


# ---------------------------------------------------------------------------- block-wise absmax
def quantize_blockwise(x: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Absmax quantisation of ``x`` (any shape) to indices of the sorted ``code`` (K,).

    Returns ``idx`` (n,) int64, the nearest code value to x_i / absmax_block, and ``absmax``
    (ceil(n / blocksize),) fp32. A last, partial block is its own block; an all-zero block
    has absmax 0 and every index pointing at the code's zero.
    """
    flat = x.reshape(-1).float()
    n = flat.numel()
    n_blocks = -(-n // blocksize)
    blocks = torch.nn.functional.pad(flat, (0, n_blocks * blocksize - n)).view(n_blocks, blocksize)
    absmax = blocks.abs().amax(dim=1)  # (n_blocks,)
    scaled = (blocks * (1.0 / absmax.clamp(min=1e-38)).unsqueeze(1)).clamp(-1.0, 1.0)  # (n_blocks, blocksize)
    midpoints = (code[:-1] + code[1:]) / 2  # (K - 1,) decision boundaries between neighbours
    idx = torch.bucketize(scaled.reshape(-1)[:n], midpoints.to(x.device))  # (n,)
    return idx, absmax


def dequantize_blockwise(idx: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int) -> torch.Tensor:
    """code[idx] * absmax of each element's block: idx (n,) -> fp32 (n,)."""
    scale = absmax.repeat_interleave(blocksize)[: idx.numel()]  # (n,)
    return code.to(idx.device)[idx.long()] * scale


# ---------------------------------------------------------------------------- nibble packing
def pack_nibbles(idx: torch.Tensor) -> torch.Tensor:
    """4-bit indices (n,) -> uint8 (ceil(n / 2),): element 2i high nibble, 2i + 1 low nibble."""
    idx = idx.to(torch.uint8)
    if idx.numel() % 2:
        idx = torch.cat([idx, idx.new_full((1,), NF4_ZERO_INDEX)])
    return (idx[0::2] << 4) | idx[1::2]


def unpack_nibbles(packed: torch.Tensor, n: int) -> torch.Tensor:
    """uint8 (ceil(n / 2),) -> indices (n,) int64, the inverse of `pack_nibbles`."""
    pairs = torch.stack([packed >> 4, packed & 0x0F], dim=1)  # (n/2, 2)
    return pairs.reshape(-1)[:n].long()


# ---------------------------------------------------------------------------- NF4 tensors
@dataclass
class NF4Tensor:
    """A weight stored in NF4: packed indices and its (optionally double-quantised) block scales.

    ``packed`` uint8 (ceil(n / 2),); ``absmax`` (n_blocks,) fp32, or uint8 codes of the
    dynamic map when double-quantised, in which case ``absmax_scale`` fp32
    (ceil(n_blocks / 256),) and ``absmax_offset`` fp32 () restore them. ``shape`` / ``dtype``
    are those of the original weight.
    """

    packed: torch.Tensor
    absmax: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int = NF4_BLOCKSIZE
    absmax_scale: Optional[torch.Tensor] = None
    absmax_offset: Optional[torch.Tensor] = None

    @property
    def double_quant(self) -> bool:
        return self.absmax_scale is not None

    @property
    def numel(self) -> int:
        return self.shape.numel()

    @property
    def nbytes(self) -> int:
        """Bytes of everything stored: indices, block scales and their second-level statistics."""
        extra = [self.absmax_scale, self.absmax_offset] if self.double_quant else []
        return sum(t.numel() * t.element_size() for t in [self.packed, self.absmax, *extra])


def nf4_quantize(w: torch.Tensor, blocksize: int = NF4_BLOCKSIZE, double_quant: bool = True) -> NF4Tensor:
    """Quantise ``w`` (any shape, fp32/bf16/fp16) to NF4 with block-wise absmax."""
    if w.numel() == 0:
        raise ValueError("cannot quantise an empty tensor")
    idx, absmax = quantize_blockwise(w, nf4_code(w.device), blocksize)
    q = NF4Tensor(pack_nibbles(idx), absmax, w.shape, w.dtype, blocksize)
    if double_quant:
        offset = absmax.mean()
        codes, scale = quantize_blockwise(absmax - offset, dynamic_code().to(w.device), ABSMAX_BLOCKSIZE)
        q.absmax, q.absmax_scale, q.absmax_offset = codes.to(torch.uint8), scale, offset
    return q


def nf4_absmax(q: NF4Tensor) -> torch.Tensor:
    """The fp32 block absmax of ``q`` (n_blocks,), undoing the double quantisation if any."""
    if not q.double_quant:
        return q.absmax
    code = dynamic_code().to(q.absmax.device)
    return dequantize_blockwise(q.absmax, q.absmax_scale, code, ABSMAX_BLOCKSIZE) + q.absmax_offset


def nf4_dequantize(q: NF4Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """NF4 -> a dense tensor of ``q.shape`` in ``dtype`` (default: the original dtype).

    Values are code * absmax in fp32, then rounded once to ``dtype``.
    """
    idx = unpack_nibbles(q.packed, q.numel)
    out = dequantize_blockwise(idx, nf4_absmax(q), nf4_code(q.packed.device), q.blocksize)
    return out.view(q.shape).to(dtype or q.dtype)


def bnb_quant_state(q: NF4Tensor, dtype: Optional[torch.dtype] = None) -> Any:
    """A ``bitsandbytes.functional.QuantState`` over our tensors (no copies), for its kernels.

    ``dtype`` is the dtype bitsandbytes dequantises to. The state describes the *flat* tensor
    (numel,): bitsandbytes 0.50's CPU dequantisation kernel treats each row of an (m, n) state
    as starting a new block and so scales rows wrongly when n is not a multiple of the
    blocksize; on the flat view every kernel agrees with the (flat) quantisation.
    """
    from bitsandbytes.functional import QuantState  # lazy: importing bitsandbytes prints warnings

    device = q.packed.device
    state2 = None
    if q.double_quant:
        state2 = QuantState(absmax=q.absmax_scale, code=dynamic_code().to(device), blocksize=ABSMAX_BLOCKSIZE,
                            dtype=torch.float32)
    return QuantState(
        absmax=q.absmax, shape=torch.Size([q.numel]), dtype=dtype or q.dtype, blocksize=q.blocksize,
        code=nf4_code(device), quant_type="nf4", offset=q.absmax_offset, state2=state2,
    )


def bnb_dequantize(q: NF4Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """`nf4_dequantize` computed by ``bitsandbytes.functional.dequantize_4bit`` (its CPU/CUDA kernels)."""
    from bitsandbytes.functional import dequantize_4bit  # lazy, see bnb_quant_state

    return dequantize_4bit(q.packed, bnb_quant_state(q, dtype)).view(q.shape)
