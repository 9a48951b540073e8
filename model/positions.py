"""Position information: rotary embeddings (RoPE) with context-extension scalings, and ALiBi.

- RoPE: Su et al. 2021, "RoFormer: Enhanced Transformer with Rotary Position Embedding", in
  the rotate-half layout of GPT-NeoX / Hugging Face Llama (pairs are (i, i + d/2)).
- Scalings of the inverse frequencies (the same numbers as ``transformers``'
  ``ROPE_INIT_FUNCTIONS``):
  ``linear`` (Chen et al. 2023, position interpolation), ``dynamic`` (NTK-aware base
  rescaled from the current sequence length, bloc97 / emozilla 2023), ``yarn`` (Peng et al.
  2023, NTK-by-parts + attention temperature) and ``llama3`` (Llama 3.1 wavelength bands).
- ALiBi: Press et al. 2022, "Train Short, Test Long: Attention with Linear Biases".

RoPE is always applied at absolute positions; tables are computed on the fly in fp32 (no
buffers, so nothing to initialise after a meta-device build and nothing for ``.to(bf16)``
to round).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from model.config import RopeScaling

# ---------------------------------------------------------------------------- RoPE


def _base_inv_freq(dim: int, base: float) -> torch.Tensor:
    """theta_i = base^(-2i/dim) for i < dim/2, fp32 on the CPU. -> (dim/2,)"""
    exponent = torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim
    return 1.0 / (base**exponent)


def _yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN attention temperature sqrt(1/t) = 0.1 ln(s) + 1 (Peng et al. 2023, eq. 22)."""
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def yarn_softmax_mscale(scaling: Optional[RopeScaling]) -> float:
    """Extra softmax-scale factor of MLA under YaRN (DeepSeek-V2/V3): mscale(factor, mscale_all_dim)^2.

    1.0 without scaling or when ``mscale_all_dim`` is 0 (the DeepSeek reference code applies it
    whenever ``mscale_all_dim`` is set).
    """
    if scaling is None or not scaling.mscale_all_dim:
        return 1.0
    m = _yarn_get_mscale(scaling.factor, scaling.mscale_all_dim)
    return m * m


def rope_inv_freq(
    dim: int,
    theta: float,
    scaling: Optional[RopeScaling] = None,
    max_seq_len: int = 2048,
    seq_len: Optional[int] = None,
) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (dim/2,) fp32 (CPU) and the attention scaling applied to cos/sin.

    ``dim`` is the rotary dimension (head_dim, or qk_rope_head_dim for MLA). ``max_seq_len`` is
    the model's context length; it stands for the pre-training length when the scaling sets no
    ``original_max_position_embeddings``. ``seq_len`` is the current sequence length (only
    ``dynamic`` uses it).
    """
    if scaling is None:
        return _base_inv_freq(dim, theta), 1.0
    factor = scaling.factor
    original = scaling.original_max_position_embeddings or max_seq_len

    if scaling.type == "linear":
        return _base_inv_freq(dim, theta) / factor, 1.0

    if scaling.type == "dynamic":
        length = original if seq_len is None else max(seq_len, original)
        base = theta * ((factor * length / original) - (factor - 1)) ** (dim / (dim - 2))
        return _base_inv_freq(dim, base), 1.0

    if scaling.type == "llama3":
        inv_freq = _base_inv_freq(dim, theta)
        low_freq_wavelen = original / scaling.low_freq_factor
        high_freq_wavelen = original / scaling.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        # long wavelengths are interpolated (divided by factor), short ones kept
        scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
        # the band in between blends the two smoothly
        smooth = (original / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
        return torch.where(is_medium, smoothed, scaled), 1.0

    # yarn: interpolate low frequencies, extrapolate high ones, linear ramp between
    if scaling.attention_factor is not None:
        attention_factor = scaling.attention_factor
    elif scaling.mscale and scaling.mscale_all_dim:
        attention_factor = _yarn_get_mscale(factor, scaling.mscale) / _yarn_get_mscale(factor, scaling.mscale_all_dim)
    else:
        attention_factor = _yarn_get_mscale(factor)

    def correction_dim(num_rotations: float) -> float:
        # the dimension whose wavelength makes num_rotations turns over the original length
        return (dim * math.log(original / (num_rotations * 2 * math.pi))) / (2 * math.log(theta))

    low = max(math.floor(correction_dim(scaling.beta_fast)), 0)
    high = min(math.ceil(correction_dim(scaling.beta_slow)), dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low), 0, 1)
    pos_freqs = theta ** (torch.arange(0, dim, 2, device="cpu").float() / dim)
    extrapolation = 1.0 / pos_freqs
    interpolation = 1.0 / (factor * pos_freqs)
    extrapolation_weight = 1 - ramp
    inv_freq = interpolation * (1 - extrapolation_weight) + extrapolation * extrapolation_weight
    return inv_freq, float(attention_factor)


def rope_cos_sin(
    inv_freq: torch.Tensor, positions: torch.Tensor, attention_scaling: float = 1.0, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables (B, T, dim) for absolute ``positions`` (B, T), computed in fp32;
    ``inv_freq`` is shared (dim/2,) or per row (B, dim/2)."""
    inv_freq = inv_freq.to(positions.device)
    if inv_freq.dim() == 2:
        inv_freq = inv_freq[:, None, :]  # (B, 1, dim/2)
    freqs = positions[..., None].float() * inv_freq  # (B, T, dim/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, dim) rotate-half layout
    cos, sin = emb.cos(), emb.sin()
    if attention_scaling != 1.0:
        cos, sin = cos * attention_scaling, sin * attention_scaling
    return cos.to(dtype), sin.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) over the two halves of the last dimension."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, T, H, D) by cos/sin (B, T, D): x * cos + rotate_half(x) * sin."""
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)  # (B, T, 1, D) broadcast over heads
    return x * cos + rotate_half(x) * sin


class RotaryEmbedding(nn.Module):
    """cos/sin for one RoPE configuration (a base theta and an optional scaling).

    Holds no parameters or buffers: the inverse frequencies are a plain fp32 tensor, moved to
    the positions' device on first use. ``dynamic`` recomputes them on every call from each
    row's own length ``max(positions[b]) + 1`` (transformers' ``dynamic_rope_update`` takes the
    batch's longest row; per row, a sequence's output never depends on its batch-mates).
    """

    def __init__(self, dim: int, theta: float, scaling: Optional[RopeScaling], max_seq_len: int) -> None:
        super().__init__()
        self.dim, self.theta, self.scaling, self.max_seq_len = dim, theta, scaling, max_seq_len
        self.dynamic = scaling is not None and scaling.type == "dynamic"
        inv_freq, self.attention_scaling = rope_inv_freq(dim, theta, scaling, max_seq_len)
        self._inv_freq = {torch.device("cpu"): inv_freq}  # device -> (dim/2,) fp32

    def inv_freq(self, device: torch.device) -> torch.Tensor:
        if device not in self._inv_freq:
            self._inv_freq[device] = self._inv_freq[torch.device("cpu")].to(device)
        return self._inv_freq[device]

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (B, T) -> (cos, sin), each (B, T, dim) in ``dtype``."""
        if self.dynamic:
            inv_freq = self.dynamic_inv_freq((positions.amax(dim=-1) + 1).tolist())  # (B, dim/2)
        else:
            inv_freq = self.inv_freq(positions.device)
        return rope_cos_sin(inv_freq, positions, self.attention_scaling, dtype)

    def dynamic_inv_freq(self, seq_lens: list[int]) -> torch.Tensor:
        """Dynamic-NTK inverse frequencies (B, dim/2) fp32 (CPU), row b for length seq_lens[b]."""
        by_len = {n: rope_inv_freq(self.dim, self.theta, self.scaling, self.max_seq_len, n)[0] for n in set(seq_lens)}
        return torch.stack([by_len[n] for n in seq_lens])

    def extra_repr(self) -> str:
        kind = "none" if self.scaling is None else self.scaling.type
        return f"dim={self.dim}, theta={self.theta}, scaling={kind}"


SHARED_PREFIX = -1
"""The document id of a row's shared prefix (``doc_ids``): every document of the row sees it.

Prefix-shared packing lays one prompt out once, followed by its completions, in one row:
``doc_ids = [-1]*P + [1]*n1 + [2]*n2 + ...``. Each completion attends to the prompt and to its
own earlier tokens, and its positions continue after the prompt's, so every completion token
gets exactly the hidden state it would have as ``prompt + completion`` alone (online RL trains
G completions of a prompt while computing the prompt once). The prefix must open the row."""


def positions_from_doc_ids(doc_ids: torch.Tensor) -> torch.Tensor:
    """Positions that restart at 0 at every document start of a packed batch: (B, T) -> (B, T).
    Documents after a row's shared prefix (`SHARED_PREFIX`) start at the prefix's length."""
    seq_len = doc_ids.shape[1]
    idx = torch.arange(seq_len, device=doc_ids.device).expand_as(doc_ids)  # (B, T)
    is_start = torch.ones_like(doc_ids, dtype=torch.bool)
    is_start[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    doc_start = torch.where(is_start, idx, torch.zeros_like(idx)).cummax(dim=1).values  # (B, T)
    shared = doc_ids == SHARED_PREFIX  # (B, T)
    prefix_len = shared.sum(dim=1, keepdim=True)  # (B, 1), 0 without a shared prefix
    return idx - doc_start + torch.where(shared, torch.zeros_like(prefix_len), prefix_len)


def document_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """doc_ids (B, T) -> (B, T, T) bool: query i may see key j of its own document or of the
    row's shared prefix (causality is the caller's)."""
    return (doc_ids[:, :, None] == doc_ids[:, None, :]) | (doc_ids[:, None, :] == SHARED_PREFIX)


# ---------------------------------------------------------------------------- ALiBi


def alibi_slopes(n_heads: int) -> torch.Tensor:
    """Per-head ALiBi slopes (n_heads,) fp32.

    For n a power of two: m_i = 2^(-8 i / n), i = 1..n. Otherwise take the n' = 2^floor(log2 n)
    slopes of n', then every other slope of 2n' starting from the first (2^(-4/n'),
    2^(-12/n'), ..., which fall between the first ones) for the remaining n - n' heads,
    the rule of the paper's reference code.
    """

    def power_of_two(n: int) -> list[float]:
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    closest = 2 ** math.floor(math.log2(n_heads))
    slopes = power_of_two(closest)
    if closest != n_heads:
        slopes += power_of_two(2 * closest)[0::2][: n_heads - closest]
    return torch.tensor(slopes, dtype=torch.float32, device="cpu")


def alibi_bias(slopes: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
    """ALiBi bias m_h * (j - i) (<= 0 for keys in the past): slopes (H,), q_pos (T,), k_pos (S,) -> (H, T, S)."""
    distance = (k_pos[None, :] - q_pos[:, None]).float()  # (T, S)
    return slopes.to(distance.device)[:, None, None] * distance[None]
