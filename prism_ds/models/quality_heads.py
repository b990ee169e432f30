"""Quality heads g_theta: map a backbone's hidden states to one quality logit per position.

Every head takes a BackboneOutput and returns [B, L] logits (sigmoid gives g in [0, 1]), so the
PRISM loss and the sampler never depend on which head is attached. New heads register in HEADS.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from prism_ds.models.backbone import BackboneOutput
from prism_ds.models.dit import AdaLNFinalLayer, DiTBlock, Rotary
from prism_ds.models.zero_init import zeros_


class QualityHead(nn.Module):
    """Base class: forward(BackboneOutput) -> quality logits [B, L].

    per_token: the quality of a position reads that position's hidden state only, so a KV-cached sampler
    step that recomputes a slice of positions can score them (a head that attends across positions sets False).
    """

    per_token = True

    def forward(self, out: BackboneOutput) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError


class LinearQualityHead(QualityHead):
    """The paper's Sudoku head: adaLN final layer with a zero-init Linear(hidden -> 1) on the last block."""

    def __init__(self, hidden: int, cond_dim: int | None, **_):
        super().__init__()
        if cond_dim is None:
            raise ValueError("quality_head.kind='linear' is the DiT's adaLN head; backbones without adaLN "
                             "conditioning (LLaDA) use 'projection+linear'")
        self.final = AdaLNFinalLayer(hidden, cond_dim, 1)

    def forward(self, out: BackboneOutput) -> torch.Tensor:
        return self.final(out.last_hidden, out.cond).squeeze(-1)


class ProjectionLinearHead(QualityHead):
    """The paper's LLaDA head: LayerNorm -> Linear(d, d) -> GELU -> Linear(d, 1) on the final post-norm hidden
    state (~16.8M parameters at d = 4096). The last Linear starts at zero, so every token starts at g = 0.5."""

    def __init__(self, hidden: int, cond_dim: int | None = None, **_):
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, 1))
        zeros_(self.net[-1].weight, self.net[-1].bias)

    def forward(self, out: BackboneOutput) -> torch.Tensor:
        return self.net(out.last_hidden).squeeze(-1)


class AttentionLinearHead(QualityHead):
    """The paper's OpenWebText head: one more DiT block on the last block's output, then an adaLN final layer
    with a zero-init Linear(hidden -> 1) (~7.9M parameters at hidden 768). Its quality reads every position."""

    per_token = False  # the block attends across positions: a KV-cached slice pass cannot score a slice

    def __init__(self, hidden: int, cond_dim: int | None, n_heads: int | None = None, dropout: float = 0.0, **_):
        super().__init__()
        if cond_dim is None or n_heads is None:
            raise ValueError("quality_head.kind='attention+linear' is a DiT block: it needs the DiT's adaLN "
                             "conditioning and head count (LLaDA uses 'projection+linear')")
        self.rotary_emb = Rotary(hidden // n_heads)
        self.block = DiTBlock(hidden, n_heads, cond_dim, dropout=dropout)
        self.final = AdaLNFinalLayer(hidden, cond_dim, 1)

    def forward(self, out: BackboneOutput) -> torch.Tensor:
        x = out.last_hidden
        x = self.block(x, out.cond, self.rotary_emb(x.shape[1], x.device))
        return self.final(x, out.cond).squeeze(-1)


HEADS: dict[str, Callable[..., QualityHead]] = {"linear": LinearQualityHead, "projection+linear": ProjectionLinearHead,
                                               "attention+linear": AttentionLinearHead}


def build_quality_head(kind: str, hidden: int, cond_dim: int | None, n_heads: int | None = None,
                       dropout: float = 0.0) -> QualityHead:
    """Instantiate the quality head named by `quality_head.kind` (n_heads, dropout: the attention head's block)."""
    if kind not in HEADS:
        raise ValueError(f"quality_head.kind={kind!r} is unknown; available: {sorted(HEADS)}")
    return HEADS[kind](hidden=hidden, cond_dim=cond_dim, n_heads=n_heads, dropout=dropout)
