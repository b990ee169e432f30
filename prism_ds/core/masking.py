"""The forward masking process x -> z of masked diffusion (paper section 2.1, MDLM recipe)."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class MaskedBatch:
    """A clean batch x, its masked version z, and the per-sample time t used to mask it."""

    x: torch.Tensor  # [B, L] clean tokens
    z: torch.Tensor  # [B, L] tokens with masked positions set to mask_id
    masked: torch.Tensor  # [B, L] bool, True where z is the mask token
    t: torch.Tensor  # [B] time in (eps, 1]; a position is masked with probability (1 - eps) * t


def sample_times(batch_size: int, eps: float, antithetic: bool, generator: torch.Generator | None = None,
                 device: torch.device | str = "cpu") -> torch.Tensor:
    """t ~ U(eps, 1) per sample; antithetic draws stratify [0, 1) so a batch covers all noise levels."""
    u = torch.rand(batch_size, generator=generator, device=device)
    if antithetic:  # one uniform offset shared by B evenly spaced points (MDLM's low-discrepancy sampler)
        u = (u[:1] + torch.arange(batch_size, device=device) / batch_size) % 1.0
    return eps + (1 - eps) * u


def mask_tokens(x: torch.Tensor, fixed: torch.Tensor, mask_id: int, eps: float = 1e-3, antithetic: bool = False,
                generator: torch.Generator | None = None) -> MaskedBatch:
    """Mask each non-fixed position independently with probability (1 - eps) * t, t drawn per sample."""
    t = sample_times(x.shape[0], eps, antithetic, generator, x.device)
    p_mask = ((1 - eps) * t)[:, None]
    masked = (torch.rand(x.shape, generator=generator, device=x.device) < p_mask) & ~fixed
    return MaskedBatch(x=x, z=torch.where(masked, torch.full_like(x, mask_id), x), masked=masked, t=t)
