"""Unmask schedules: per step, where the sampler may act and how many tokens it unmasks and remasks.

A schedule answers one question per step, so new samplers (LLaDA's blockwise semi-AR, OWT's
binomial counts) are new schedules plugged into the same loop, not new loops. *Which* tokens are
remasked is the policy's business (remask.py); *how many* is the schedule's:
  fixed      K per step (Algorithm 3)
  binomial   K ~ Binomial(#clean, sigma_t), sigma_t = min(eta, sigma_max) (ReMDM-cap; Algorithm 2 when capped)
  per-token  every clean token independently, at total rate sigma_t = sigma_max (the published ReMDM-conf)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

REMASK_COUNTS = ("fixed", "binomial", "per-token")


@dataclass
class StepPlan:
    """Where tokens may change this step and how many to unmask / remask per row.

    The sampler unmasks `unmask` + (number actually remasked) tokens, so remasking never slows the
    sequence down. Exactly one of remask_count / remask_rate is set.
    """

    window: torch.Tensor  # [B, L] bool: positions the step may unmask or remask
    unmask: torch.Tensor  # [B] long: base unmask count
    remask_count: torch.Tensor | None = None  # [B] long: remask exactly this many (fewer if fewer are clean)
    remask_rate: torch.Tensor | None = None  # [B] float: per-token draws at this total rate


class Schedule:
    """Base class: plan(step, num_steps, masked, clean, target, remasking, generator) -> StepPlan."""

    def plan(self, step: int, num_steps: int, masked: torch.Tensor, clean: torch.Tensor, target: torch.Tensor,
             remasking: bool, generator: torch.Generator | None = None) -> StepPlan:
        """masked / clean: [B, L] bool non-fixed positions that are masked / filled; target: [B] positions to
        generate in total; remasking: False for vanilla sampling, where nothing is remasked."""
        raise NotImplementedError


def sigma_max(step: int, num_steps: int) -> float:
    """ReMDM's largest remask probability min(1, (1 - alpha_s) / alpha_t) on the even grid alpha = step / N."""
    alpha_t, alpha_s = step / num_steps, (step + 1) / num_steps
    return 1.0 if alpha_t == 0 else min(1.0, (1 - alpha_s) / alpha_t)


class EvenSchedule(Schedule):
    """Algorithms 2 and 3: spread the unmasking evenly over the steps; remask by `remask_count`.

    Counted remasking (fixed / binomial K) is active only while K < #generated < #target - K, as in the
    authors' code; no rule remasks before `start_step` (l_on) or on the last step, so the sequence is
    complete after exactly num_steps steps.
    """

    def __init__(self, remask_count: str = "fixed", remask_k: int = 0, eta: float = 1.0, start_step: int = 0):
        if remask_count not in REMASK_COUNTS:
            raise ValueError(f"sampler.remask_count={remask_count!r}: expected one of {REMASK_COUNTS}")
        if remask_k < 0:
            raise ValueError(f"sampler.remask_k={remask_k} must be >= 0")
        if remask_count == "binomial" and not 0 < eta <= 1:
            raise ValueError(f"sampler.eta={eta} must be in (0, 1]")
        self.remask_count, self.remask_k, self.eta, self.start_step = remask_count, remask_k, eta, start_step

    def plan(self, step: int, num_steps: int, masked: torch.Tensor, clean: torch.Tensor, target: torch.Tensor,
             remasking: bool, generator: torch.Generator | None = None) -> StepPlan:
        n_masked = masked.sum(1)
        steps_left = num_steps - step
        base = torch.div(n_masked + steps_left - 1, steps_left, rounding_mode="floor")  # ceil, spread evenly
        window = torch.ones_like(masked)
        on = remasking and step >= self.start_step and steps_left > 1
        sigma = sigma_max(step, num_steps)
        if self.remask_count == "per-token":
            return StepPlan(window, base, remask_rate=torch.full(base.shape, sigma if on else 0.0,
                                                                 device=base.device, dtype=torch.float64))
        if self.remask_count == "fixed":
            k = torch.full_like(base, self.remask_k)
        else:
            rate = torch.full(base.shape, min(self.eta, sigma), device=base.device, dtype=torch.float64)
            k = torch.binomial(clean.sum(1).double(), rate, generator=generator).long()
        generated = target - n_masked
        active = on & (k > 0) & (generated > k) & (generated < target - k)
        return StepPlan(window, base, remask_count=torch.where(active, k, torch.zeros_like(k)))


def unmask_scores(order: str, token_probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Priority of each masked position for unmasking: "random" order or "confidence" (highest p first)."""
    if order == "random":
        return torch.rand(token_probs.shape, generator=generator, device=token_probs.device, dtype=torch.float64)
    if order == "confidence":
        return token_probs
    raise ValueError(f"sampler.unmask_order={order!r}: expected 'random' or 'confidence'")
