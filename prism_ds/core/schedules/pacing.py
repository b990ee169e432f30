"""The schedule's clock: which step each row of a sampling batch is at, which rows need a pass, when a row leaves its
window (block) and when it has work left.

  Lockstep     every row takes every planned step, one pass each, and the plan's counts fill a window by its last
               step (every sampler without a confidence threshold)
  UntilFilled  threshold decoding (Fast-dLLM): each row passes over its own block until the block is filled
               (threshold_steps="ignore", Fast-dLLM's rule) or until the block's last planned step, which fills it
               ("cap"), then moves on to its next block. A row whose block is done never waits for the batch's
               slowest row, and a finished row leaves the batch. With a remasking policy a block's K_block remasks
               all happen in its second pass (the first with decoded tokens to judge), so the remasked tokens are
               refilled by passes the block mostly needs anyway.
pacing_for() picks one from the sampler settings.
"""
from __future__ import annotations

import torch

from prism_ds.core.schedules.base import Schedule, StepPlan

THRESHOLD_STEPS = ("ignore", "cap")  # Fast-dLLM: a block takes passes until full | its planned steps cap them


def k_block_needs_inner_step(policy: str, threshold: float | None, threshold_steps: str) -> bool:
    """Whether K_block remasks need a planned step after the one that makes them (to refill them): always, except
    under a threshold with Fast-dLLM's rule ("ignore"), where a block takes passes until it is full."""
    return policy != "none" and (threshold is None or threshold_steps == "cap")


def _per_row(value: bool | torch.Tensor, n: int, device: torch.device) -> torch.Tensor:
    """A plan's per-batch or per-row flag as [n] bool."""
    return value if torch.is_tensor(value) else torch.full((n,), bool(value), dtype=torch.bool, device=device)


class Lockstep:
    """Every row takes every planned step; a step makes one pass unless no row has a window (the canvas ended)."""

    def __init__(self, schedule: Schedule, num_steps: int, remasking: bool):
        self.schedule, self.num_steps, self.remasking, self.step = schedule, num_steps, remasking, 0

    def rows(self, active: torch.Tensor) -> torch.Tensor:
        """The rows to plan for now (none once the last step is taken)."""
        return active.nonzero().flatten() if self.step < self.num_steps else active.new_zeros(0, dtype=torch.long)

    def plan(self, rows: torch.Tensor, masked: torch.Tensor, clean: torch.Tensor, target: torch.Tensor,
             generator: torch.Generator | None) -> StepPlan:
        """The schedule's plan for the current step."""
        return self.schedule.plan(self.step, self.num_steps, masked, clean, target, self.remasking, generator)

    def idle(self, rows: torch.Tensor, plan: StepPlan, masked: torch.Tensor) -> torch.Tensor:
        """[R] bool: rows that take no pass now: all of them when no row has a window this step, else none."""
        return _per_row(not bool(plan.window.any()), len(rows), masked.device)

    def skip(self, rows: torch.Tensor, idle: torch.Tensor, plan: StepPlan) -> torch.Tensor:
        """Move on without a pass; [R] bool: rows that left their window."""
        return self.advance(rows, plan, None)

    def advance(self, rows: torch.Tensor, plan: StepPlan, masked: torch.Tensor | None) -> torch.Tensor:
        """After a pass: the next step; [R] bool: rows whose window closed."""
        self.step += 1
        return _per_row(plan.window_closes, len(rows), plan.window.device)

    def fills(self, plan: StepPlan) -> torch.Tensor:
        """[R] bool: rows whose window must be completely filled by this step (its last)."""
        return _per_row(plan.window_closes, len(plan.window), plan.window.device)

    def waiting(self, rows: torch.Tensor, plan: StepPlan) -> torch.Tensor:
        """[R] bool: rows with nothing masked that must still take steps (PRISM-loop's loop steps)."""
        return _per_row(self.schedule.refines_complete(self.step, self.num_steps), len(rows), plan.window.device)

    def progress(self, active: torch.Tensor) -> int:
        """Steps taken, for the progress bar."""
        return self.step


class UntilFilled:
    """Threshold decoding's pacing: per-row steps; a row passes over its block until it is filled, then moves on."""

    def __init__(self, schedule: Schedule, num_steps: int, n_rows: int, policy: str, threshold_steps: str,
                 device: torch.device):
        if getattr(schedule, "k_block", None) is None:
            raise ValueError("sampler.threshold needs the blockwise schedule (it decodes block by block)")
        # "cap": the remask round (second pass) must be refilled by a later planned step.
        schedule.check(num_steps, planned_remasks=k_block_needs_inner_step(policy, 1.0, threshold_steps))
        self.schedule, self.num_steps, self.cap = schedule, num_steps, threshold_steps == "cap"
        self.k_block = schedule.k_block if policy != "none" else 0  # the remask round's size (0: no round)
        self.step = torch.zeros(n_rows, dtype=torch.long, device=device)
        self.window_pass = torch.zeros_like(self.step)  # passes each row has made in its current window

    def rows(self, active: torch.Tensor) -> torch.Tensor:
        """The rows to plan for now: active rows whose steps are not all taken."""
        return (active & (self.step < self.num_steps)).nonzero().flatten()

    def plan(self, rows: torch.Tensor, masked: torch.Tensor, clean: torch.Tensor, target: torch.Tensor,
             generator: torch.Generator | None) -> StepPlan:
        """Each row's plan at its own step; K_block remasks on a window's second pass, none planned."""
        plan = self.schedule.plan(self.step[rows], self.num_steps, masked, clean, target, False, generator)
        round_now = self.window_pass[rows] == 1
        plan.remask_count = torch.where(round_now, torch.full_like(plan.unmask, self.k_block), 0)
        return plan

    def _round_due(self, rows: torch.Tensor, plan: StepPlan) -> torch.Tensor:
        """[R] bool: rows whose window has a remask round still to run (in its first or second pass)."""
        return plan.window.any(1) & (self.k_block > 0) & (self.window_pass[rows] < 2)

    def idle(self, rows: torch.Tensor, plan: StepPlan, masked: torch.Tensor) -> torch.Tensor:
        """[R] bool: rows whose window is filled and judged: they take no pass and move on."""
        return ~((masked & plan.window).any(1) | self._round_due(rows, plan))

    def skip(self, rows: torch.Tensor, idle: torch.Tensor, plan: StepPlan) -> torch.Tensor:
        """Move the idle rows to their next window; [R] bool: rows that left their window (the idle ones)."""
        self._leave(rows[idle])
        return idle

    def _leave(self, rows: torch.Tensor) -> None:
        self.step[rows] = self.schedule.first_step_of_next_window(self.step[rows], self.num_steps)
        self.window_pass[rows] = 0

    def advance(self, rows: torch.Tensor, plan: StepPlan, masked: torch.Tensor) -> torch.Tensor:
        """After a pass: a filled, judged window is left; an unfilled one takes the next step, or ("ignore") its last
        planned step again; [R] bool: rows that left their window."""
        self.window_pass[rows] += 1
        stay = (masked & plan.window).any(1) | self._round_due(rows, plan)
        repeat = stay & plan.window_closes & (not self.cap)  # Fast-dLLM: a block takes passes until it is full
        self.step[rows] += (stay & ~repeat).long()
        self._leave(rows[~stay])
        return ~stay

    def fills(self, plan: StepPlan) -> torch.Tensor:
        """[R] bool: rows at their window's last planned step under "cap", which fills the window."""
        return plan.window_closes & self.cap  # a per-row plan: window_closes is [R] bool

    def waiting(self, rows: torch.Tensor, plan: StepPlan) -> torch.Tensor:
        """[R] bool: rows with a remask round still to run in their current window."""
        return self._round_due(rows, plan)

    def progress(self, active: torch.Tensor) -> int:
        """The slowest active row's step, for the progress bar."""
        return int(self.step[active].min()) if bool(active.any()) else self.num_steps


def pacing_for(schedule: Schedule, num_steps: int, n_rows: int, policy: str, threshold: float | None,
               threshold_steps: str, device: torch.device) -> Lockstep | UntilFilled:
    """Lockstep, or UntilFilled under a confidence threshold."""
    if threshold is None:
        return Lockstep(schedule, num_steps, remasking=policy != "none")
    return UntilFilled(schedule, num_steps, n_rows, policy, threshold_steps, device)
