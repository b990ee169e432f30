"""Unmask schedules: per step, where the sampler may act and how many tokens it unmasks and remasks.

A schedule answers one question per step, so new samplers (LLaDA's blockwise semi-AR, OWT's
binomial counts) are new schedules plugged into the same loop, not new loops.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class StepPlan:
    """Where tokens may change this step and how many to unmask / remask per row."""

    window: torch.Tensor  # [B, L] bool: positions the step may unmask or remask
    unmask: torch.Tensor  # [B] long
    remask: torch.Tensor  # [B] long


class Schedule:
    """Base class: plan(step, num_steps, masked, target, remasking) -> StepPlan."""

    def plan(self, step: int, num_steps: int, masked: torch.Tensor, target: torch.Tensor,
             remasking: bool) -> StepPlan:
        """masked: [B, L] bool currently masked (non-fixed); target: [B] positions to generate in total;
        remasking: False for vanilla sampling, where no remask slots are planned."""
        raise NotImplementedError


class FixedKSchedule(Schedule):
    """Algorithm 3: spread the unmasking evenly over the steps and remask K tokens per step.

    Remasking is active only while K < #generated < #target - K and never on the last step, and a
    remasking step unmasks K extra tokens, so the sequence is complete after exactly num_steps steps.
    """

    def __init__(self, remask_k: int = 0, start_step: int = 0):
        if remask_k < 0:
            raise ValueError(f"sampler.remask_k={remask_k} must be >= 0")
        self.remask_k, self.start_step = remask_k, start_step

    def plan(self, step: int, num_steps: int, masked: torch.Tensor, target: torch.Tensor,
             remasking: bool) -> StepPlan:
        n_masked = masked.sum(1)
        steps_left = num_steps - step
        base = torch.div(n_masked + steps_left - 1, steps_left, rounding_mode="floor")  # ceil, spread evenly
        generated = target - n_masked
        k = self.remask_k if remasking else 0
        active = (k > 0) & (generated > k) & (generated < target - k) & (step >= self.start_step) & (steps_left > 1)
        remask = torch.where(active, torch.full_like(base, k), torch.zeros_like(base))
        unmask = torch.minimum(base + remask, n_masked)
        return StepPlan(window=torch.ones_like(masked), unmask=unmask, remask=remask)


def unmask_scores(order: str, token_probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Priority of each masked position for unmasking: "random" order or "confidence" (highest p first)."""
    if order == "random":
        return torch.rand(token_probs.shape, generator=generator, device=token_probs.device, dtype=torch.float64)
    if order == "confidence":
        return token_probs
    raise ValueError(f"sampler.unmask_order={order!r}: expected 'random' or 'confidence'")
