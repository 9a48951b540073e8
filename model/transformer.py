"""The decoder-only transformer every family is built from.

Pre-norm residual blocks (Xiong et al. 2020) as in GPT-2 / Llama (Touvron et al. 2023):

    x = x + attn(attn_norm(x));  x = x + ffn(ffn_norm(x))

with Gemma 2/3's "sandwich" variant adding ``post_attn_norm`` / ``post_ffn_norm`` on the
branch outputs. Attention is MHA/GQA/MQA, MLA or linear attention; the FFN is dense or
DeepSeekMoE per layer. Layers of type "mamba" are Mamba-2 blocks instead (`model.mamba2`:
``x + mixer(norm(x))``, no FFN), for pure Mamba-2 models and hybrid stacks. Embeddings are
optionally scaled by sqrt(dim) (Gemma, in the embedding dtype like Hugging Face), the head
is optionally tied to them, and the final logits optionally soft-capped (Gemma 2). RoPE
tables are computed once per forward for each layer type: Gemma 3 sliding layers use
``rope_local_theta`` without scaling, the other layers ``rope_theta`` and ``rope_scaling``.
DeepSeek-V3 multi-token prediction modules live in ``mtp``.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from model.attention import Attention, Rope
from model.cache import KVCache
from model.config import ModelConfig
from model.ffn import FeedForward
from model.linear_attention import LinearAttention
from model.linear_ce import linear_cross_entropy
from model.mamba2 import MambaBlock
from model.mla import MLA
from model.moe import MoE, moe_aux_loss
from model.mtp import MTPModule
from model.norms import build_norm
from model.positions import SHARED_PREFIX, RotaryEmbedding, positions_from_doc_ids

ATTENTION_CLASSES = {"mha": Attention, "mla": MLA, "linear": LinearAttention}


class Block(nn.Module):
    """One pre-norm transformer block: attention then FFN, each on a residual branch."""

    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_type = cfg.layer_type(layer_idx)
        self.attn_norm = build_norm(cfg, cfg.dim)
        self.attn = ATTENTION_CLASSES[cfg.attention_type](cfg, layer_idx)
        self.ffn_norm = build_norm(cfg, cfg.dim)
        if cfg.is_moe_layer(layer_idx):
            self.ffn = MoE(cfg)
        else:
            self.ffn = FeedForward(cfg.dim, cfg.ffn_hidden_dim, cfg.ffn_type, cfg.mlp_bias)
        self.post_attn_norm = build_norm(cfg, cfg.dim) if cfg.sandwich_norm else None
        self.post_ffn_norm = build_norm(cfg, cfg.dim) if cfg.sandwich_norm else None
        self.dropout = cfg.dropout

    def _branch_out(self, h: torch.Tensor, post_norm: Optional[nn.Module]) -> torch.Tensor:
        if post_norm is not None:
            h = post_norm(h)
        if self.dropout > 0:
            h = F.dropout(h, self.dropout, self.training)
        return h

    def forward(
        self,
        x: torch.Tensor,
        rope: Rope,
        positions: torch.Tensor,
        cache: Optional[object] = None,
        doc_ids: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """x (B, T, D) -> (B, T, D)."""
        x = x + self._branch_out(self.attn(self.attn_norm(x), rope, positions, cache, doc_ids), self.post_attn_norm)
        return x + self._branch_out(self.ffn(self.ffn_norm(x)), self.post_ffn_norm)

    def init_cache(self, batch_size: int, max_seq_len: int, device: torch.device, dtype: torch.dtype) -> Any:
        return self.attn.init_cache(batch_size, max_seq_len, device, dtype)


BLOCK_TYPES = (Block, MambaBlock)


def build_block(cfg: ModelConfig, layer_idx: int) -> nn.Module:
    """The block of layer ``layer_idx``: a Mamba-2 block for layer type "mamba", else a transformer block."""
    return MambaBlock(cfg, layer_idx) if cfg.layer_type(layer_idx) == "mamba" else Block(cfg, layer_idx)


class Transformer(nn.Module):
    """Embedding -> blocks -> final norm -> head (+ optional MTP modules)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(build_block(cfg, i) for i in range(cfg.n_layers))
        self.norm = build_norm(cfg, cfg.dim)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        # the MTP blocks take the attention / FFN kind of the last main layer
        self.mtp = nn.ModuleList(MTPModule(cfg, build_block(cfg, cfg.n_layers - 1)) for _ in range(cfg.mtp_depth))
        self.embed_scale = cfg.dim**0.5 if cfg.embed_scale else None

        self.rope: Optional[RotaryEmbedding] = None
        self.rope_local: Optional[RotaryEmbedding] = None
        if cfg.position_type == "rope":
            rot_dim = cfg.qk_rope_head_dim if cfg.attention_type == "mla" else cfg.attn_head_dim
            self.rope = RotaryEmbedding(rot_dim, cfg.rope_theta, cfg.rope_scaling, cfg.max_seq_len)
            if cfg.rope_local_theta is not None:  # Gemma 3 local layers: own base, never scaled
                self.rope_local = RotaryEmbedding(rot_dim, cfg.rope_local_theta, None, cfg.max_seq_len)

    # ------------------------------------------------------------------ pieces
    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, T) -> (B, T, D), times sqrt(dim) rounded to the embedding dtype (Gemma)."""
        h = self.embed(tokens)
        if self.embed_scale is not None:
            h = h * torch.tensor(self.embed_scale, dtype=h.dtype)
        return h

    def rope_tables(self, positions: torch.Tensor, dtype: torch.dtype) -> dict[str, Rope]:
        """RoPE (cos, sin) per layer type ("full", "sliding"); None values without RoPE and for "mamba"."""
        if self.rope is None:
            return {"full": None, "sliding": None, "mamba": None}
        full = self.rope(positions, dtype)
        local = self.rope_local(positions, dtype) if self.rope_local is not None else full
        return {"full": full, "sliding": local, "mamba": None}

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Normalised hidden (B, T, D) -> logits (B, T, V), soft-capped when configured."""
        logits = self.lm_head(h) if self.lm_head is not None else F.linear(h, self.embed.weight)
        cap = self.cfg.final_logit_softcap
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def default_positions(
        self, tokens: torch.Tensor, cache: Optional[KVCache] = None, doc_ids: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """cache.length + arange(T), or positions restarting per document when doc_ids is given."""
        if doc_ids is not None:
            return positions_from_doc_ids(doc_ids)
        batch, seq_len = tokens.shape
        start = cache.length if cache is not None else 0
        return torch.arange(start, start + seq_len, device=tokens.device).expand(batch, seq_len)

    # ------------------------------------------------------------------ forward
    def forward_hidden(
        self,
        tokens: torch.Tensor,
        positions: Optional[torch.Tensor] = None,
        cache: Optional[KVCache] = None,
        doc_ids: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """tokens (B, T) -> last hidden states (B, T, D), before the final norm.

        With a cache, T > 1 is a prefill and T = 1 a decode step; the tokens go to the cache
        slots ``positions`` (default: cache.length + arange(T)), shared by all rows.
        ``doc_ids`` (B, T) marks packed documents (no attention across them; positions then
        default to restarting per document); it cannot be combined with a cache.
        """
        if cache is not None and doc_ids is not None:
            raise ValueError("doc_ids (packed documents) cannot be combined with a cache")
        if doc_ids is not None and self.cfg.has_mamba and bool((doc_ids == SHARED_PREFIX).any()):
            raise ValueError("a shared prefix (doc id -1) needs attention: a Mamba-2 scan cannot fork its state "
                             "into several documents")
        explicit = positions is not None
        if positions is None:
            positions = self.default_positions(tokens, cache, doc_ids)
        h = self.embed_tokens(tokens)  # (B, T, D)
        tables = self.rope_tables(positions, h.dtype)
        for i, layer in enumerate(self.layers):
            h = layer(h, tables[layer.layer_type], positions, None if cache is None else cache[i], doc_ids)
        if cache is not None and not cache.paged:
            end = int(positions[0, -1]) + 1 if explicit else cache.length + tokens.shape[1]
            cache.length = max(cache.length, end)
        return h

    def forward(
        self,
        tokens: torch.Tensor,
        positions: Optional[torch.Tensor] = None,
        cache: Optional[KVCache] = None,
        doc_ids: Optional[torch.Tensor] = None,
        keep: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """tokens (B, T) -> logits (B, T, V). See `forward_hidden` for the arguments.

        ``keep`` (B, T) bool: logits only where it is True, flattened in row-major order (N, V).
        Objectives that score a few positions (the responses of RL and preference training)
        skip the (T, V) head and its softmax everywhere else.

        ``labels`` (B, T): instead of logits, the summed next-token cross-entropy over the
        labels that are not -100, a fp32 scalar (`head_cross_entropy`: no (B, T, V) logits).
        """
        h = self.forward_hidden(tokens, positions, cache, doc_ids)  # (B, T, D)
        if labels is not None:
            return self.head_cross_entropy(self.norm(h), labels)
        if keep is not None:
            h = h[keep]  # (N, D)
        return self.head(self.norm(h))

    def head_cross_entropy(self, h: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Summed cross-entropy of `head` (normalised hidden h (..., D)) against labels (...), -100
        ignored, fp32. A plain (or tied) head goes through `model.linear_ce.linear_cross_entropy`,
        which never holds the (N, V) logits; a wrapped head (LoRA, 4-bit) computes them."""
        if self.lm_head is None or (type(self.lm_head) is nn.Linear and self.lm_head.bias is None):
            weight = self.embed.weight if self.lm_head is None else self.lm_head.weight
            return linear_cross_entropy(h, weight, labels, softcap=self.cfg.final_logit_softcap)
        logits = self.head(h).float()  # (..., V)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="sum")

    def mtp_logits(
        self,
        hidden: torch.Tensor,
        tokens: torch.Tensor,
        positions: Optional[torch.Tensor] = None,
        doc_ids: Optional[torch.Tensor] = None,
    ) -> list[torch.Tensor]:
        """Multi-token prediction logits from ``forward_hidden``'s output.

        hidden (B, T, D), tokens (B, T) the model input. Element k-1 (depth k) has shape
        (B, T - k, V): row i predicts token t_{i+k+1}, so it lines up with ``labels[:, k:]``
        when ``labels[:, i]`` = t_{i+1}.
        """
        return [self.head(h) for h in self.mtp_hidden(hidden, tokens, positions, doc_ids)]

    def mtp_hidden(
        self,
        hidden: torch.Tensor,
        tokens: torch.Tensor,
        positions: Optional[torch.Tensor] = None,
        doc_ids: Optional[torch.Tensor] = None,
    ) -> list[torch.Tensor]:
        """The normalised hidden states (B, T - k, D) of each MTP depth k, before the shared head
        (`mtp_logits`; training scores them with `head_cross_entropy`)."""
        if positions is None:
            positions = self.default_positions(tokens, None, doc_ids)
        seq_len = tokens.shape[1]
        outs: list[torch.Tensor] = []
        h = hidden
        for k, module in enumerate(self.mtp, start=1):
            n = seq_len - k
            pos = positions[:, :n]
            docs = None if doc_ids is None else doc_ids[:, :n]
            rope = self.rope_tables(pos, hidden.dtype)[module.block.layer_type]
            h = module(h[:, :n], self.embed_tokens(tokens[:, k:]), rope, pos, docs)  # (B, T - k, D)
            outs.append(module.norm(h))
        return outs

    # ------------------------------------------------------------------ helpers
    def aux_loss(self) -> Optional[torch.Tensor]:
        """Sum of the MoE auxiliary losses of the last forward (None when there are none)."""
        return moe_aux_loss(self)

    def init_cache(
        self,
        batch_size: int,
        max_seq_len: int,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> KVCache:
        """An empty cache for ``batch_size`` rows of up to ``max_seq_len`` positions."""
        device = device if device is not None else self.embed.weight.device
        dtype = dtype if dtype is not None else self.embed.weight.dtype
        return KVCache([layer.init_cache(batch_size, max_seq_len, device, dtype) for layer in self.layers])
