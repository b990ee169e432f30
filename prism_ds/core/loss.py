"""The PRISM objective (equation 3): BCE on the quality of y's filled tokens + lambda * MDM loss on z; and the
Token-Critic baseline's loss (the PRISM authors' `AdapterFinetuneTokenCriticLoss`)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def mdm_loss(logits: torch.Tensor, x: torch.Tensor, masked: torch.Tensor, t: torch.Tensor,
             lengths: torch.Tensor | float) -> torch.Tensor:
    """Per sample, the sum over masked positions of CE(x_i | z) / t divided by `lengths`; mean over the batch.

    lengths = the sample's maskable positions (Sudoku cells; the answer plus its EOS pads for
    prompt/solution data, as in LLaDA's SFT). About n = t * lengths positions are masked, so this is the
    MDLM/LLaDA form of the paper's (1/n) sum of CE over the n masked positions (equal when n = t * lengths),
    and lambda weighs the two terms of equation (3) as the paper's lambda does.
    """
    ce = F.cross_entropy(logits.float().transpose(1, 2), x, reduction="none")  # [B, L]
    return ((ce * masked / t[:, None]).sum(1) / lengths).mean()


def prism_loss(quality_logits: torch.Tensor, label: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """BCE-with-logits between g_i(y) and 1[x_i = y_i], averaged over all chosen positions."""
    bce = F.binary_cross_entropy_with_logits(quality_logits.float(), label, reduction="none")
    return (bce * chosen).sum() / chosen.sum().clamp_min(1)


def token_critic_loss(critic_logits: torch.Tensor, label: torch.Tensor, masked: torch.Tensor, t: torch.Tensor,
                      lengths: torch.Tensor | float) -> torch.Tensor:
    """Per sample, the sum over the masked positions of BCE(critic_i(x̂), 1[x̂_i = x_i]) / t divided by `lengths`;
    mean over the batch.

    x̂ is z with every mask filled by f_theta in one step; only the positions that were masked are supervised, and
    the 1/t weight and the normaliser are the MDM loss's (the authors divide by B * L with every position maskable).
    """
    bce = F.binary_cross_entropy_with_logits(critic_logits.float(), label.float(), reduction="none")  # [B, L]
    return ((bce * masked / t[:, None]).sum(1) / lengths).mean()
