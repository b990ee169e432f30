"""One training step's loss: the masking process, y-construction and the PRISM loss wired together.

Exactly two backbone passes: z (grad; MDM loss and, detached, the y proposal) and y (grad; quality).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from prism_ds.core.loss import mdm_loss, prism_loss
from prism_ds.core.masking import mask_tokens
from prism_ds.core.y_construction import build_y


@dataclass
class StepLosses:
    """Loss terms of one step plus what the monitor needs (quality logits and labels)."""

    total: torch.Tensor
    mdm: torch.Tensor
    prism: torch.Tensor | None = None
    quality: torch.Tensor | None = None  # [N] quality logits at the chosen positions (detached)
    label: torch.Tensor | None = None  # [N] 1[x_i = y_i] at the chosen positions
    tokens: int = 0  # tokens processed by the backbone this step


def compute_losses(model, x: torch.Tensor, fixed: torch.Tensor, mask_id: int, mode: str, masking_cfg, prism_cfg,
                   lengths: torch.Tensor | float | None = None, generator: torch.Generator | None = None,
                   allowed_tokens: torch.Tensor | None = None) -> StepLosses:
    """Loss for `mode` "pretrain" (MDM only) or "prism" (PRISM + lambda * MDM).

    lengths: per-sample MDM normaliser [B], the maskable positions of each sample (Sudoku cells, answer
    tokens); None = the sequence length. allowed_tokens: bool [V], what y may hold (as at sampling time).
    """
    batch = mask_tokens(x, fixed, mask_id, eps=masking_cfg.eps, antithetic=masking_cfg.antithetic, generator=generator)
    norm = x.shape[1] if lengths is None else lengths
    out_z = model(batch.z, need_logits=True, need_quality=False)
    mdm = mdm_loss(out_z.logits, x, batch.masked, batch.t, norm)
    if mode == "pretrain":
        return StepLosses(total=mdm, mdm=mdm, tokens=x.numel())
    candidates = batch.masked
    if prism_cfg.y_window > 0:  # y only among the first y_window maskable positions (the paper's LLaDA run: 512)
        candidates = candidates & ((~fixed).cumsum(1) <= prism_cfg.y_window)
    yb = build_y(x, batch.z, candidates, out_z.logits, k=prism_cfg.k, n_y=prism_cfg.n_y,
                 positions=prism_cfg.y_positions, top_p=prism_cfg.nucleus_p, temperature=prism_cfg.temperature,
                 generator=generator, mask_id=mask_id, allowed_tokens=allowed_tokens)
    quality = model(yb.y, need_logits=False, need_quality=True).quality
    prism = prism_loss(quality, yb.label, yb.chosen)
    return StepLosses(total=prism + prism_cfg.lam * mdm, mdm=mdm, prism=prism,
                      quality=quality.detach()[yb.chosen], label=yb.label[yb.chosen],
                      tokens=x.numel() + yb.y.numel())
