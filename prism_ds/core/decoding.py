"""Decoders: which masked tokens of the window become clean on a step (the schedule says how many may).

  CountDecoder      the plan's count (plus the tokens remasked this step, so remasking never slows the sequence
                    down), chosen by unmask order: "random" or "confidence" (highest probability first); or, when
                    the plan gives a per-token rate (ancestral sampling: MDLM, the published ReMDM samplers), an
                    independent draw per masked token
  ThresholdDecoder  Fast-dLLM's parallel decoding: every masked token whose confidence is at least tau, and the most
                    confident one (so every pass makes progress)
Both fill the whole window for the rows the pacing says must be filled now (a window's last step).
"""
from __future__ import annotations

import torch

from prism_ds.core.sampling_utils import select_top
from prism_ds.core.schedules import StepPlan


UNMASK_ORDERS = ("random", "confidence")


class CountDecoder:
    """A fixed count per step (the plan's), by unmask order; or the plan's per-token unmask rate."""

    def __init__(self, order: str):
        if order not in UNMASK_ORDERS:
            raise ValueError(f"sampler.unmask_order={order!r}: expected 'random' or 'confidence'")
        self.order = order

    def choose(self, plan: StepPlan, fillable: torch.Tensor, n_remasked: torch.Tensor, confidence: torch.Tensor,
               fill: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Bool [B, L]: the fillable (masked, in the window) tokens to unmask; confidence [B, L] ranks proposals."""
        if plan.unmask_rate is not None:
            u = torch.rand(fillable.shape, generator=generator, device=fillable.device, dtype=torch.float64)
            return (u < plan.unmask_rate[:, None]) & fillable
        if bool(fill.all()):  # before any draw, so a closing step consumes no random numbers
            return fillable
        count = torch.minimum(plan.unmask + n_remasked, fillable.sum(1))
        scores = confidence if self.order == "confidence" else torch.rand(  # "random": a uniform order
            fillable.shape, generator=generator, device=fillable.device, dtype=torch.float64)
        chosen = select_top(scores, fillable, count)
        return chosen | (fillable & fill[:, None])


class ThresholdDecoder:
    """Every fillable token whose confidence is at least tau, and the most confident one."""

    def __init__(self, tau: float):
        self.tau = tau  # in (0, 1]: checked with the other fast-sampling settings (sampler.check_fast_sampling)

    def choose(self, plan: StepPlan, fillable: torch.Tensor, n_remasked: torch.Tensor, confidence: torch.Tensor,
               fill: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Bool [B, L]: the fillable tokens to unmask (the plan's count is not used)."""
        most = select_top(confidence, fillable, torch.ones(len(fillable), dtype=torch.long, device=fillable.device))
        return fillable & ((confidence >= self.tau) | most | fill[:, None])


def decoder_for(threshold: float | None, unmask_order: str) -> CountDecoder | ThresholdDecoder:
    """ThresholdDecoder under a confidence threshold, else CountDecoder by unmask order."""
    return CountDecoder(unmask_order) if threshold is None else ThresholdDecoder(threshold)
