"""Algorithms 2 and 3 of the paper, and MDLM's / ReMDM's ancestral sampler, on one even time grid."""
from __future__ import annotations

import torch

from prism_ds.core.schedules.base import REMASK_COUNTS, Schedule, StepPlan, sigma_max


class EvenSchedule(Schedule):
    """Algorithms 2 and 3: spread the unmasking evenly over the steps; remask by `remask_count`.

    Counted remasking (fixed / binomial K) is active only while K < #generated < #target - K, as in the
    authors' code; no rule remasks before `start_step` (l_on) or on the last step, so the sequence is
    complete after exactly num_steps steps. The binomial rate is min(eta, sigma_max) with `cap` (the
    authors' code, ReMDM-cap) and eta itself without it (Algorithm 2 as printed).

    ancestral=True is the sampler MDLM and ReMDM publish (`_ddpm_caching_update`): on the grid alpha_t = step / N,
    every masked token unmasks independently with probability (alpha_s - alpha_t) / (1 - alpha_t), plus
    sigma * alpha_t / (1 - alpha_t) under the binomial count (ReMDM-cap: every clean token remasks at rate sigma,
    and the masked ones make up for it on average); the per-token count (ReMDM-conf) adds nothing, as ReMDM's
    conf sampler. Remasking then has no K window: ReMDM's rates are zero where they must be (sigma_max = 0 on the
    last step). The last step unmasks every masked token, so no argmax "noise removal" pass is ever needed.
    """

    def __init__(self, remask_count: str = "fixed", remask_k: int = 0, eta: float = 1.0, start_step: int = 0,
                 cap: bool = True, ancestral: bool = False):
        if remask_count not in REMASK_COUNTS:
            raise ValueError(f"sampler.remask_count={remask_count!r}: expected one of {REMASK_COUNTS}")
        if remask_k < 0:
            raise ValueError(f"sampler.remask_k={remask_k} must be >= 0")
        if remask_count == "binomial" and not 0 < eta <= 1:
            raise ValueError(f"sampler.eta={eta} must be in (0, 1]")
        self.remask_count, self.remask_k, self.eta, self.start_step = remask_count, remask_k, eta, start_step
        self.cap, self.ancestral = cap, ancestral

    def plan(self, step: int, num_steps: int, masked: torch.Tensor, clean: torch.Tensor, target: torch.Tensor,
             remasking: bool, generator: torch.Generator | None = None) -> StepPlan:
        n_masked = masked.sum(1)
        steps_left = num_steps - step
        base = torch.div(n_masked + steps_left - 1, steps_left, rounding_mode="floor")  # ceil, spread evenly
        window = torch.ones_like(masked)
        on = remasking and step >= self.start_step and steps_left > 1
        smax = sigma_max(step, num_steps)
        closes = steps_left == 1
        sigma = min(self.eta, smax) if self.cap else self.eta  # the binomial rate
        if self.ancestral:
            return self._ancestral(step, num_steps, window, base, clean, remasking, on, smax, sigma, closes, generator)
        if self.remask_count == "per-token":
            return StepPlan(window, base, remask_rate=torch.full(base.shape, smax if on else 0.0,
                                                                 device=base.device, dtype=torch.float64),
                            window_closes=closes)
        if self.remask_count == "fixed":
            k = torch.full_like(base, self.remask_k)
        else:  # drawn even where inactive, so the random stream does not depend on l_on
            k = torch.binomial(clean.sum(1).double(), torch.full(base.shape, sigma, device=base.device,
                                                                 dtype=torch.float64), generator=generator).long()
        generated = target - n_masked
        active = on & (k > 0) & (generated > k) & (generated < target - k)
        return StepPlan(window, base, remask_count=torch.where(active, k, torch.zeros_like(k)), window_closes=closes)

    def _ancestral(self, step, num_steps, window, base, clean, remasking, on, smax, sigma, closes, generator):
        """Per-token unmask rates of the reverse process, and ReMDM's remask rule without a K window."""
        if remasking and self.remask_count == "fixed":
            raise ValueError("ancestral sampling remasks by a rate: use a row with :binomial (ReMDM-cap) or "
                             ":per-token (ReMDM-conf), not a fixed K")
        alpha_t, alpha_s = step / num_steps, (step + 1) / num_steps
        rate = (alpha_s - alpha_t) / (1 - alpha_t)  # alpha_t < 1 on every step of the grid
        full = lambda v: torch.full(base.shape, v, device=base.device, dtype=torch.float64)  # noqa: E731
        if self.remask_count == "per-token":
            return StepPlan(window, base, remask_rate=full(smax if on else 0.0), unmask_rate=full(min(rate, 1.0)),
                            window_closes=closes)
        sigma = sigma if on else 0.0
        k = torch.binomial(clean.sum(1).double(), full(sigma), generator=generator).long() if on \
            else torch.zeros_like(base)
        rate += sigma * alpha_t / (1 - alpha_t)
        return StepPlan(window, base, remask_count=k, unmask_rate=full(min(rate, 1.0)), window_closes=closes)
