"""A reward model: the decoder backbone with a scalar head read at the last real token.

As in InstructGPT (Ouyang et al. 2022, §3.5) and Hugging Face's ``*ForSequenceClassification``
with ``num_labels=1``: the transformer runs over ``prompt + response``, a linear ``score``
layer (dim → 1, no bias) maps every position's final hidden state to a scalar, and the
sequence's reward is the scalar at its *last non-padding token*. There is no language-model
head (``lm_head`` is dropped; a tied embedding is only the input embedding here) and no
multi-token-prediction modules.

Tensor names are the backbone's (``embed.weight``, ``layers.N...``, ``norm.weight``) plus
``score.weight``, so a policy checkpoint initialises a reward model unit by unit and
`model.hf` exports it as ``<Family>ForSequenceClassification``.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from model.config import ModelConfig
from model.transformer import Transformer

SCORE_INIT_STD = 0.02  # transformers' initializer_range for the score head


def reward_backbone_config(cfg: ModelConfig) -> ModelConfig:
    """The backbone config of a reward model built from a policy config: no MTP modules."""
    return cfg.model_copy(update={"mtp_depth": 0}) if cfg.mtp_depth else cfg


class RewardModel(Transformer):
    """Transformer backbone + ``score`` head. ``forward`` returns one reward per row."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(reward_backbone_config(cfg))
        self.lm_head = None  # never used: the score head replaces it
        self.score = nn.Linear(self.cfg.dim, 1, bias=False)

    def reset_score(self, generator: Optional[torch.Generator] = None) -> None:
        """N(0, 0.02²) init of the score head (as transformers initialises it)."""
        with torch.no_grad():
            w = torch.randn(self.score.weight.shape, generator=generator, dtype=torch.float32)
            self.score.weight.copy_(w * SCORE_INIT_STD)

    def token_rewards(self, tokens: torch.Tensor, positions: Optional[torch.Tensor] = None,
                      doc_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """tokens (B, T) → the scalar head at every position (B, T), fp32 (``doc_ids``: packed documents)."""
        h = self.norm(self.forward_hidden(tokens, positions, doc_ids=doc_ids))  # (B, T, D)
        return self.score(h.to(self.score.weight.dtype)).squeeze(-1).float()  # (B, T)

    def forward(self, tokens: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,  # type: ignore[override]
                positions: Optional[torch.Tensor] = None) -> torch.Tensor:
        """tokens (B, T), right-padded, attention_mask (B, T) 1 on real tokens → rewards (B,).

        Without a mask every token is real (the reward is read at the last position).
        Padding sits after the real tokens, so causal attention keeps it out of their view.
        """
        scores = self.token_rewards(tokens, positions)  # (B, T)
        last = last_token_index(attention_mask, tokens.shape[1], tokens.device, tokens.shape[0])  # (B,)
        return scores.gather(1, last[:, None]).squeeze(1)


def last_token_index(attention_mask: Optional[torch.Tensor], seq_len: int, device: torch.device,
                     batch: int) -> torch.Tensor:
    """Index of each row's last real token (B,): the rightmost position where the mask is 1."""
    if attention_mask is None:
        return torch.full((batch,), seq_len - 1, dtype=torch.long, device=device)
    positions = torch.arange(seq_len, device=device).expand_as(attention_mask)
    return (positions * (attention_mask != 0)).amax(dim=1)
