"""Loop samplers for unconditional text (OpenWebText, paper section 4.2) and the row -> schedule factory.

  LoopSchedule       PRISM-loop (Algorithm 4, appendices C.1 and D.2): a complete Algorithm-2 generation in
                     N_g steps, then N_l loop steps that each remask M uniformly random tokens before the
                     forward pass and refill all of them from it
  RemdmLoopSchedule  ReMDM-loop (Wang et al. 2025): unmask to alpha_on, then hold the masked count while
                     remasking and refilling K ~ Bin(#clean, eta) tokens per step, then finish
  even_family_schedule(kind, count, cfg, N)  the schedule of a sampler row "policy[:count][/kind]" (even,
                     ancestral, loop, remdm-loop)
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from prism_ds.core.schedules.base import SCHEDULE_KINDS, Schedule, StepPlan
from prism_ds.core.schedules.even import EvenSchedule

if TYPE_CHECKING:
    from prism_ds.config import SamplerConfig


def _ceil(x: float) -> int:
    """ceil(x), ignoring float noise (0.3 * 10 is 3.0000000000000004, and l_on must be 3)."""
    return math.ceil(round(x, 9))


class LoopSchedule(Schedule):
    """PRISM-loop (Algorithm 4): `inner` for the first gen_steps steps, then loop_steps loop steps.

    `inner` is a complete gen_steps-step schedule: with even_family_schedule its eta and l_on come from
    N_g = gen_steps, not from the whole budget N (eta = eta_steps / N_g, l_on = ceil(remask_start * N_g)),
    so the generation phase IS an N_g-step PRISM run, as D.2's "initial N/2-step generation". Each loop
    step remasks min(M, #clean) positions, uniformly at random among the clean non-fixed ones, before
    that step's forward pass and refills all of them from it (Algorithm 4, lines 4-6). The row's policy
    only acts in the generation phase: loop-step selection is always uniform.
    """

    def __init__(self, inner: Schedule, gen_steps: int, loop_steps: int, loop_m: int):
        if loop_m < 1:
            raise ValueError(f"sampler.loop_m={loop_m} must be >= 1")
        if gen_steps < 1 or loop_steps < 0:
            raise ValueError(f"PRISM-loop needs >= 1 generation step and >= 0 loop steps, got {gen_steps} and "
                             f"{loop_steps}")
        self.inner, self.gen_steps, self.loop_steps, self.loop_m = inner, gen_steps, loop_steps, loop_m

    def plan(self, step: int, num_steps: int, masked: torch.Tensor, clean: torch.Tensor, target: torch.Tensor,
             remasking: bool, generator: torch.Generator | None = None) -> StepPlan:
        if num_steps != self.gen_steps + self.loop_steps:
            raise ValueError(f"this PRISM-loop schedule was built for N = {self.gen_steps + self.loop_steps} steps "
                             f"({self.gen_steps} generation + {self.loop_steps} loop), not {num_steps}")
        if step < self.gen_steps:
            plan = self.inner.plan(step, self.gen_steps, masked, clean, target, remasking, generator)
            plan.window_closes = plan.window_closes and self.loop_steps == 0  # the loop steps still change it
            return plan
        n_masked = masked.sum(1)  # normally 0: the generation phase filled everything
        m = torch.full_like(n_masked, self.loop_m if remasking else 0)
        return StepPlan(torch.ones_like(masked), n_masked, remask_count=torch.zeros_like(n_masked), pre_remask=m,
                        window_closes=step == num_steps - 1)

    def refines_complete(self, step: int, num_steps: int) -> bool:
        """Complete rows take every loop step (the loop steps are the last ones)."""
        return self.loop_steps > 0 and step < num_steps


class RemdmLoopSchedule(Schedule):
    """ReMDM-loop (Wang et al. 2025) on the grid t_l = 1 - l / N, step l running at t_l.

    t_l > t_on:           unmask evenly so that ceil(alpha_on * target) tokens are clean when the loop starts
    t_off < t_l <= t_on:  the loop: remask K ~ Bin(#clean, eta) (selection by the row's policy) and unmask
                          as many from the same pass, so the masked count stays constant (K is capped at
                          the masked count for that reason; with nothing masked the loop is idle)
    t_l <= t_off:         unmask evenly so the sequence is complete after N steps (the last step always is
                          in this phase, even when N * t_off < 1)
    Nothing is remasked outside the loop.
    """

    def __init__(self, t_on: float = 0.55, t_off: float = 0.05, alpha_on: float = 0.9, eta: float = 0.02):
        if not 0 <= t_off < t_on <= 1:
            raise ValueError(f"sampler.loop_t_on={t_on} / sampler.loop_t_off={t_off}: need 0 <= t_off < t_on <= 1")
        if not 0 < alpha_on <= 1:
            raise ValueError(f"sampler.loop_alpha_on={alpha_on} must be in (0, 1]")
        if not 0 < eta <= 1:
            raise ValueError(f"sampler.loop_eta={eta} must be in (0, 1]")
        self.t_on, self.t_off, self.alpha_on, self.eta = t_on, t_off, alpha_on, eta

    def phases(self, num_steps: int) -> tuple[int, int]:
        """(first loop step, first finishing step): t_l <= t_on iff l >= N (1 - t_on); t_l <= t_off likewise."""
        end = min(_ceil(num_steps * (1 - self.t_off)), num_steps - 1)
        return min(_ceil(num_steps * (1 - self.t_on)), end), end

    def plan(self, step: int, num_steps: int, masked: torch.Tensor, clean: torch.Tensor, target: torch.Tensor,
             remasking: bool, generator: torch.Generator | None = None) -> StepPlan:
        start, end = self.phases(num_steps)
        n_masked = masked.sum(1)
        k = torch.zeros_like(n_masked)
        if step < start:
            clean_on = torch.ceil(torch.round(self.alpha_on * target.double(), decimals=9)).long()
            left = (n_masked - (target - clean_on)).clamp_min(0)  # still to unmask before the loop
            base = torch.div(left + (start - step) - 1, start - step, rounding_mode="floor")
        elif step < end:
            base = torch.zeros_like(n_masked)
            if remasking:
                rate = torch.full(n_masked.shape, self.eta, device=n_masked.device, dtype=torch.float64)
                k = torch.minimum(torch.binomial(clean.sum(1).double(), rate, generator=generator).long(), n_masked)
        else:
            steps_left = num_steps - step
            base = torch.div(n_masked + steps_left - 1, steps_left, rounding_mode="floor")
        return StepPlan(torch.ones_like(masked), base, remask_count=k, window_closes=step == num_steps - 1)


def _algorithm2(count: str, cfg: SamplerConfig, num_steps: int, ancestral: bool = False) -> EvenSchedule:
    """Algorithm 2/3 (or the ancestral sampler) for an N-step run: eta = eta_steps / N (or eta), l_on =
    ceil(remask_start * N)."""
    if not 0 <= cfg.remask_start <= 1:
        raise ValueError(f"sampler.remask_start={cfg.remask_start} must be in [0, 1] (l_on = ceil(remask_start * N); "
                         f"> 1 would put l_on > N)")
    if cfg.eta_steps < 0:
        raise ValueError(f"sampler.eta_steps={cfg.eta_steps} must be >= 0 (0 uses sampler.eta)")
    eta = cfg.eta_steps / num_steps if cfg.eta_steps > 0 else cfg.eta
    if count == "binomial" and not 0 < eta <= 1:  # eta is only read by the binomial count
        if cfg.eta_steps > 0:
            raise ValueError(f"sampler.eta_steps={cfg.eta_steps} gives eta = eta_steps / N = {eta:.4g} > 1 at "
                             f"N = {num_steps} (generation) steps; eta must be in (0, 1]")
        raise ValueError(f"sampler.eta={cfg.eta} must be in (0, 1]")
    return EvenSchedule(count, cfg.remask_k, eta, start_step=_ceil(cfg.remask_start * num_steps), cap=cfg.eta_cap,
                        ancestral=ancestral)


def loop_split(cfg: SamplerConfig, num_steps: int) -> tuple[int, int]:
    """PRISM-loop's (N_g, N_l): N_l = round(loop_fraction * N) (half up), at most N - 1 (one step must generate)."""
    if not 0 < cfg.loop_fraction < 1:
        raise ValueError(f"sampler.loop_fraction={cfg.loop_fraction} must be in (0, 1)")
    n_loop = min(num_steps - 1, math.floor(round(cfg.loop_fraction * num_steps, 9) + 0.5))
    return num_steps - n_loop, n_loop


def even_family_schedule(kind: str, count: str, cfg: SamplerConfig, num_steps: int) -> Schedule:
    """The schedule of a row "policy[:count][/kind]" (even | ancestral | loop | remdm-loop) for an N-step budget."""
    if kind not in SCHEDULE_KINDS:
        raise ValueError(f"sampler.policies: schedule {kind!r} is not one of {SCHEDULE_KINDS}")
    if num_steps < 1:
        raise ValueError(f"sampler steps={num_steps} must be >= 1")
    if kind in ("even", "ancestral"):
        return _algorithm2(count, cfg, num_steps, ancestral=kind == "ancestral")
    if kind == "remdm-loop":  # its own count rule (Bin(#clean, loop_eta) in the loop); `count` is not used
        return RemdmLoopSchedule(cfg.loop_t_on, cfg.loop_t_off, cfg.loop_alpha_on, cfg.loop_eta)
    gen_steps, loop_steps = loop_split(cfg, num_steps)
    return LoopSchedule(_algorithm2(count, cfg, gen_steps), gen_steps, loop_steps, cfg.loop_m)
