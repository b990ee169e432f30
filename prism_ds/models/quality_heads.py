"""Quality heads g_theta: map a backbone's hidden states to one quality logit per position.

Every head takes a BackboneOutput and returns [B, L] logits (sigmoid gives g in [0, 1]), so the
PRISM loss and the sampler never depend on which head is attached. New heads register in HEADS.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from prism_ds.models.dit import AdaLNFinalLayer, BackboneOutput


class QualityHead(nn.Module):
    """Base class: forward(BackboneOutput) -> quality logits [B, L]."""

    def forward(self, out: BackboneOutput) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError


class LinearQualityHead(QualityHead):
    """The paper's Sudoku head: adaLN final layer with a zero-init Linear(hidden -> 1) on the last block."""

    def __init__(self, hidden: int, cond_dim: int):
        super().__init__()
        self.final = AdaLNFinalLayer(hidden, cond_dim, 1)

    def forward(self, out: BackboneOutput) -> torch.Tensor:
        return self.final(out.last_hidden, out.cond).squeeze(-1)


HEADS: dict[str, Callable[..., QualityHead]] = {"linear": LinearQualityHead}


def build_quality_head(kind: str, hidden: int, cond_dim: int) -> QualityHead:
    """Instantiate the quality head named by `quality_head.kind`."""
    if kind not in HEADS:
        raise ValueError(f"quality_head.kind={kind!r} is unknown; available: {sorted(HEADS)}")
    return HEADS[kind](hidden=hidden, cond_dim=cond_dim)
