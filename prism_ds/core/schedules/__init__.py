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
even_family_schedule() builds the even / ancestral / loop / remdm-loop schedule of a sampler row from SamplerConfig
and N (rows are "policy[:count][/schedule]", see core/remask.parse_row).
*Which* tokens are remasked is the policy's business (core/remask.py); *how many* is the schedule's:
  fixed      K per step (Algorithm 3), or K_block per block (blockwise)
  binomial   K ~ Binomial(#clean, sigma_t), sigma_t = min(eta, sigma_max) (ReMDM-cap; Algorithm 2 when capped)
  per-token  every clean token independently, at total rate sigma_t = sigma_max (the published ReMDM-conf)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

REMASK_COUNTS = ("fixed", "binomial", "per-token")
SCHEDULE_KINDS = ("even", "ancestral", "loop", "remdm-loop")  # the "/schedule" of a sampler row


@dataclass
class StepPlan:
    """Where tokens may change this step and how many to unmask / remask per row.

    The sampler unmasks `unmask` + (number actually remasked) tokens, so remasking never slows the
    sequence down; or, when `unmask_rate` is set, each masked token of the window independently with that
    probability (ancestral sampling). Exactly one of remask_count / remask_rate is set.
    """

    window: torch.Tensor  # [B, L] bool: positions the step may unmask or remask
    unmask: torch.Tensor  # [B] long: base unmask count
    remask_count: torch.Tensor | None = None  # [B] long: remask exactly this many (fewer if fewer are clean)
    remask_rate: torch.Tensor | None = None  # [B] float: per-token draws at this total rate
    window_closes: bool = False  # the last step of a window (a block): everything in it is filled after this step
    # [B] long: clean tokens of the window to remask uniformly at random *before* the pass (PRISM-loop steps);
    # they are refilled from that same pass, on top of `unmask`.
    pre_remask: torch.Tensor | None = None
    unmask_rate: torch.Tensor | None = None  # [B] float: per-masked-token unmask probability (replaces `unmask`)
    window_id: int | None = None  # which window this is (the block index), when the schedule has windows


class Schedule:
    """Base class: plan(step, num_steps, masked, clean, target, remasking, generator) -> StepPlan."""

    def plan(self, step: int, num_steps: int, masked: torch.Tensor, clean: torch.Tensor, target: torch.Tensor,
             remasking: bool, generator: torch.Generator | None = None) -> StepPlan:
        """masked / clean: [B, L] bool non-fixed positions that are masked / filled; target: [B] positions to
        generate in total; remasking: False for vanilla sampling, where nothing is remasked."""
        raise NotImplementedError

    def refines_complete(self, step: int, num_steps: int) -> bool:
        """Whether a row with nothing left to unmask must still take step `step` or a later one (loop steps)."""
        return False


def sigma_max(step: int, num_steps: int) -> float:
    """ReMDM's largest remask probability min(1, (1 - alpha_s) / alpha_t) on the even grid alpha = step / N."""
    alpha_t, alpha_s = step / num_steps, (step + 1) / num_steps
    return 1.0 if alpha_t == 0 else min(1.0, (1 - alpha_s) / alpha_t)


def unmask_scores(order: str, token_probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Priority of each masked position for unmasking: "random" order or "confidence" (highest p first)."""
    if order == "random":
        return torch.rand(token_probs.shape, generator=generator, device=token_probs.device, dtype=torch.float64)
    if order == "confidence":
        return token_probs
    raise ValueError(f"sampler.unmask_order={order!r}: expected 'random' or 'confidence'")


# The schedule modules import the names above, so they come last.
from prism_ds.core.schedules.blockwise import BlockwiseSchedule, blockwise_schedule  # noqa: E402
from prism_ds.core.schedules.even import EvenSchedule  # noqa: E402
from prism_ds.core.schedules.loop import LoopSchedule, RemdmLoopSchedule, even_family_schedule  # noqa: E402

__all__ = ["REMASK_COUNTS", "SCHEDULE_KINDS", "StepPlan", "Schedule", "sigma_max", "unmask_scores",
           "BlockwiseSchedule", "blockwise_schedule", "EvenSchedule", "LoopSchedule", "RemdmLoopSchedule",
           "even_family_schedule"]
