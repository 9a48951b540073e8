"""Multi-token prediction modules of DeepSeek-V3 (Liu et al. 2024, §2.2).

Depth k (k = 1..D) predicts token t_{i+k+1} from position i, sequentially after depth k-1:

    h'_i = proj([enorm(Emb(t_{i+k})); hnorm(h^{k-1}_i)])      (2D -> D)
    h^k  = block(h')                                          (one transformer block)
    logits^k = OutHead(norm(h^k))                             (embedding and head shared)

h^0 is the main model's last hidden state (before its final norm). The concatenation order
[embedding; hidden] is that of the released DeepSeek-V3 weights (``eh_proj``). The loss on
these logits is added by the trainer with weight ``mtp_loss_weight``; at inference the
modules can be dropped.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from model.config import ModelConfig
from model.norms import build_norm


class MTPModule(nn.Module):
    """One prediction depth: ``enorm``, ``hnorm``, ``proj``, ``block`` and its own final ``norm``."""

    def __init__(self, cfg: ModelConfig, block: nn.Module) -> None:
        super().__init__()
        self.enorm = build_norm(cfg, cfg.dim)
        self.hnorm = build_norm(cfg, cfg.dim)
        self.proj = nn.Linear(2 * cfg.dim, cfg.dim, bias=False)
        self.block = block
        self.norm = build_norm(cfg, cfg.dim)

    def forward(
        self,
        hidden: torch.Tensor,
        emb: torch.Tensor,
        rope: Optional[tuple[torch.Tensor, torch.Tensor]],
        positions: torch.Tensor,
        doc_ids: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """hidden h^{k-1} (B, T, D) and Emb(t_{i+k}) (B, T, D) -> h^k (B, T, D), before ``norm``."""
        x = self.proj(torch.cat([self.enorm(emb), self.hnorm(hidden)], dim=-1))  # (B, T, D)
        return self.block(x, rope, positions, None, doc_ids)
