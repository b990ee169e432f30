"""One training step's loss: the masking process, y-construction and the PRISM loss wired together.

Exactly two backbone passes: z (grad; MDM loss and, detached, the y proposal) and y (grad; quality).
The Token-Critic baseline ("critic" mode) also makes two: the frozen f_theta on z (no grad; x̂ and, as a
diagnostic, f_theta's MDM loss) and the critic on x̂ (grad).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from prism_ds.core.loss import mdm_loss, prism_loss, token_critic_loss
from prism_ds.core.masking import mask_tokens
from prism_ds.core.sampler import fill_masks
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
                   allowed_tokens: torch.Tensor | None = None, f_theta=None) -> StepLosses:
    """Loss for `mode` "pretrain" (MDM only), "prism" (PRISM + lambda * MDM) or "critic" (Token-Critic: `model`
    is the critic, `f_theta` the frozen MDM that fills x̂).

    lengths: per-sample MDM normaliser [B], the maskable positions of each sample (Sudoku cells, answer
    tokens); None = the sequence length. allowed_tokens: bool [V], what y may hold (as at sampling time).
    """
    if mode == "critic":
        return critic_losses(model, f_theta, x, fixed, mask_id, masking_cfg, prism_cfg, lengths, generator,
                             allowed_tokens)
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


def critic_losses(critic, f_theta, x: torch.Tensor, fixed: torch.Tensor, mask_id: int, masking_cfg, prism_cfg,
                  lengths: torch.Tensor | float | None = None, generator: torch.Generator | None = None,
                  allowed_tokens: torch.Tensor | None = None) -> StepLosses:
    """The Token-Critic step of the PRISM authors' Sudoku code: mask x to z, fill *every* mask of z from the frozen
    f_theta in one step (x̂, drawn as PRISM's y: prism.temperature, prism.nucleus_p), score x̂ with the critic and
    train it with token_critic_loss against 1[x̂_i = x_i] on the masked positions.

    StepLosses.prism holds the critic loss; .mdm is f_theta's own MDM loss on z (no gradient, a diagnostic).
    """
    if f_theta is None:
        raise ValueError("the critic loss needs the frozen f_theta that fills x̂")
    batch = mask_tokens(x, fixed, mask_id, eps=masking_cfg.eps, antithetic=masking_cfg.antithetic, generator=generator)
    norm = x.shape[1] if lengths is None else lengths
    with torch.no_grad():  # f_theta is frozen: x̂ is data for the critic
        logits = f_theta(batch.z, need_logits=True, need_quality=False).logits
        mdm = mdm_loss(logits, x, batch.masked, batch.t, norm)
    x_hat = fill_masks(logits, batch.z, batch.masked, mask_id, allowed_tokens, temperature=prism_cfg.temperature,
                       top_p=prism_cfg.nucleus_p, generator=generator)
    quality = critic(x_hat, need_logits=False, need_quality=True).quality
    label = (x_hat == x).float()
    loss = token_critic_loss(quality, label, batch.masked, batch.t, norm)
    return StepLosses(total=loss, mdm=mdm, prism=loss, quality=quality.detach()[batch.masked],
                      label=label[batch.masked], tokens=2 * x.numel())
