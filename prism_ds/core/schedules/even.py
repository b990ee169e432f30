"""Algorithms 2 and 3 of the paper: unmasking spread evenly over the steps, remasking by a count rule."""
from __future__ import annotations

import torch

from prism_ds.core.schedules import REMASK_COUNTS, Schedule, StepPlan, sigma_max


class EvenSchedule(Schedule):
    """Algorithms 2 and 3: spread the unmasking evenly over the steps; remask by `remask_count`.

    Counted remasking (fixed / binomial K) is active only while K < #generated < #target - K, as in the
    authors' code; no rule remasks before `start_step` (l_on) or on the last step, so the sequence is
    complete after exactly num_steps steps. The binomial rate is min(eta, sigma_max) with `cap` (the
    authors' code, ReMDM-cap) and eta itself without it (Algorithm 2 as printed).
    """

    def __init__(self, remask_count: str = "fixed", remask_k: int = 0, eta: float = 1.0, start_step: int = 0,
                 cap: bool = True):
        if remask_count not in REMASK_COUNTS:
            raise ValueError(f"sampler.remask_count={remask_count!r}: expected one of {REMASK_COUNTS}")
        if remask_k < 0:
            raise ValueError(f"sampler.remask_k={remask_k} must be >= 0")
        if remask_count == "binomial" and not 0 < eta <= 1:
            raise ValueError(f"sampler.eta={eta} must be in (0, 1]")
        self.remask_count, self.remask_k, self.eta, self.start_step = remask_count, remask_k, eta, start_step
        self.cap = cap

    def plan(self, step: int, num_steps: int, masked: torch.Tensor, clean: torch.Tensor, target: torch.Tensor,
             remasking: bool, generator: torch.Generator | None = None) -> StepPlan:
        n_masked = masked.sum(1)
        steps_left = num_steps - step
        base = torch.div(n_masked + steps_left - 1, steps_left, rounding_mode="floor")  # ceil, spread evenly
        window = torch.ones_like(masked)
        on = remasking and step >= self.start_step and steps_left > 1
        sigma = sigma_max(step, num_steps)
        closes = steps_left == 1
        if self.remask_count == "per-token":
            return StepPlan(window, base, remask_rate=torch.full(base.shape, sigma if on else 0.0,
                                                                 device=base.device, dtype=torch.float64),
                            window_closes=closes)
        if self.remask_count == "fixed":
            k = torch.full_like(base, self.remask_k)
        else:
            rate = torch.full(base.shape, min(self.eta, sigma) if self.cap else self.eta, device=base.device,
                              dtype=torch.float64)
            k = torch.binomial(clean.sum(1).double(), rate, generator=generator).long()
        generated = target - n_masked
        active = on & (k > 0) & (generated > k) & (generated < target - k)
        return StepPlan(window, base, remask_count=torch.where(active, k, torch.zeros_like(k)), window_closes=closes)
