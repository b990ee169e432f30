"""The base of every schedule: the StepPlan a step runs, the Schedule interface, and the shared rates and orders."""
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
    # The last step of a window (a block): everything in it is filled after this step. A bool, or [B] bool when
    # rows are at steps of their own (threshold decoding), as window_id is then [B] long.
    window_closes: bool | torch.Tensor = False
    # [B] long: clean tokens of the window to remask uniformly at random *before* the pass (PRISM-loop steps);
    # they are refilled from that same pass, on top of `unmask`.
    pre_remask: torch.Tensor | None = None
    unmask_rate: torch.Tensor | None = None  # [B] float: per-masked-token unmask probability (replaces `unmask`)
    window_id: int | torch.Tensor | None = None  # which window this is (the block index), when the schedule has windows


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

