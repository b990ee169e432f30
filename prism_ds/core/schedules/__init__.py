"""Unmask schedules: per step, where the sampler may act and how many tokens it unmasks and remasks.

A schedule answers one question per step, so new samplers are new schedules plugged into the same
loop, not new loops:
  EvenSchedule       (even.py) Algorithms 2 and 3: unmasking spread evenly over all steps (Sudoku, OWT); with
                     ancestral=True, MDLM's and ReMDM's ancestral sampler: each masked token unmasks independently
                     at the reverse process's rate (the published MDLM, ReMDM-cap and ReMDM-conf samplers)
  BlockwiseSchedule  (blockwise.py) LLaDA's semi-autoregressive blocks with K_block remasks per block
  LoopSchedule       (loop.py) PRISM-loop (Algorithm 4): an even-schedule generation, then loop steps that
                     remask M random tokens before the pass and refill them from it
  RemdmLoopSchedule  (loop.py) ReMDM-loop (Wang et al. 2025): unmask to alpha_on, hold the masked count
                     while remasking and refilling, then finish
The pacing (pacing.py) is the schedule's clock: which step each row is at, which rows need a pass, and when a
row leaves its window: every row takes every planned step (Lockstep), or, under threshold decoding, each row
passes over its own block until it is filled and moves on (UntilFilled).
even_family_schedule() builds the even / ancestral / loop / remdm-loop schedule of a sampler row from SamplerConfig
and N (rows are "policy[:count][/schedule]", see core/remask.parse_row).
*Which* tokens are remasked is the policy's business (core/remask.py); *how many* is the schedule's:
  fixed      K per step (Algorithm 3), or K_block per block (blockwise)
  binomial   K ~ Binomial(#clean, sigma_t), sigma_t = min(eta, sigma_max) (ReMDM-cap; Algorithm 2 when capped)
  per-token  every clean token independently, at total rate sigma_t = sigma_max (the published ReMDM-conf)
"""
from __future__ import annotations

from prism_ds.core.schedules.base import REMASK_COUNTS, SCHEDULE_KINDS, Schedule, StepPlan, sigma_max
from prism_ds.core.schedules.blockwise import BlockwiseSchedule, blockwise_schedule
from prism_ds.core.schedules.even import EvenSchedule
from prism_ds.core.schedules.loop import LoopSchedule, RemdmLoopSchedule, even_family_schedule

__all__ = ["REMASK_COUNTS", "SCHEDULE_KINDS", "StepPlan", "Schedule", "sigma_max",
           "BlockwiseSchedule", "blockwise_schedule", "EvenSchedule", "LoopSchedule", "RemdmLoopSchedule",
           "even_family_schedule"]
