"""LLaDA's semi-autoregressive blockwise schedule with K_block remasks per block (paper appendix D.6).

Each row's generated positions (those neither prompt nor padding) are cut into blocks of block_length,
counted from the row's first generated position and decoded left to right; the steps are split evenly over
the blocks. Two layouts, chosen by how the schedule is built:
  gen_length  (LLaDA's generate.py) prompt + gen_length masks, gen_length / block_length blocks; batched
              prompts are left-padded, so every row's blocks share their columns
  canvas      (the PRISM authors' llada_inference) every row is `canvas` positions: its prompt, then masks to
              the end; canvas // block_length blocks, of which a row uses those its masks reach (the last one
              usually partial, later ones empty), each with steps // (canvas // block_length) steps. At N = 256
              and a 1024 canvas in blocks of 32 that is 8 steps per block: the paper's MBPP regime
Inside a block the unmask counts are spread evenly (remainder first, as LLaDA's sampler) and the block's
K_block remasks go to the steps nearest the block's middle (never its first step, which has nothing to
remask, nor its last, which must fill the block). Only the current block's positions may change.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from prism_ds.core.schedules.base import Schedule, StepPlan

if TYPE_CHECKING:
    from prism_ds.config import SamplerConfig


def remask_steps(k_block: int, steps_per_block: int) -> list[int]:
    """Remask count of each step of a block: K_block spread over the inner steps, nearest the middle first."""
    inner = list(range(1, steps_per_block - 1))
    counts = [0] * steps_per_block
    if not inner:
        return counts
    middle = (steps_per_block - 1) / 2
    order = sorted(inner, key=lambda i: (abs(i - middle), i))
    for j in range(k_block):
        counts[order[j % len(order)]] += 1
    return counts


class BlockwiseSchedule(Schedule):
    """Blocks of block_length left to right from each row's first generated position, K_block remasks each.

    Give exactly one of gen_length (prompt + gen_length masks; LLaDA's layout) or canvas (prompt + masks up to
    `canvas` positions; the PRISM authors' layout).
    """

    def __init__(self, block_length: int, k_block: int = 0, *, gen_length: int = 0, canvas: int = 0,
                 remask_count: str = "fixed"):
        if (gen_length > 0) == (canvas > 0):
            raise ValueError(f"the blockwise sampler needs exactly one of sampler.gen_length and sampler.canvas > 0 "
                             f"(got gen_length={gen_length}, canvas={canvas})")
        length, key = (gen_length, "gen_length") if gen_length else (canvas, "canvas")
        if block_length < 1 or length % block_length:
            raise ValueError(f"sampler.block_length={block_length} must divide sampler.{key}={length}")
        if k_block < 0:
            raise ValueError(f"sampler.k_block={k_block} must be >= 0")
        if remask_count != "fixed":
            raise ValueError(f"the blockwise sampler remasks a fixed K_block per block; sampler.remask_count="
                             f"{remask_count!r} is only for the even schedule")
        self.block_length, self.k_block, self.canvas = block_length, k_block, canvas
        self.n_blocks = length // block_length
        self.blocks_desc = f"{key} / block_length = {length} / {block_length} = {self.n_blocks}"

    def check(self, num_steps: int, planned_remasks: bool = True) -> int:
        """Steps each block gets; errors name the setting. planned_remasks: K_block goes on planned steps (not
        under a threshold, where it goes to a block's second pass), which needs an inner step."""
        if num_steps < self.n_blocks or num_steps % self.n_blocks:
            raise ValueError(f"sampler steps={num_steps} must be a multiple of the number of blocks "
                             f"({self.blocks_desc})")
        per_block = num_steps // self.n_blocks
        if planned_remasks and self.k_block and per_block < 3:
            raise ValueError(f"sampler.k_block={self.k_block} needs at least 3 steps per block (the first has nothing "
                             f"to remask, the last must fill the block); steps={num_steps} gives {per_block}")
        return per_block

    def plan(self, step: int | torch.Tensor, num_steps: int, masked: torch.Tensor, clean: torch.Tensor,
             target: torch.Tensor, remasking: bool, generator: torch.Generator | None = None) -> StepPlan:
        """step: one step for every row, or [B] long, each row's own step (threshold decoding paces rows apart);
        window_closes and window_id are then per row too."""
        per_block = self.check(num_steps, planned_remasks=remasking)
        per_row = torch.is_tensor(step)
        steps = step if per_row else torch.full((len(masked),), step, dtype=torch.long, device=masked.device)
        block, i = torch.div(steps, per_block, rounding_mode="floor"), steps % per_block
        generated = masked | clean  # every position the sampler fills, in order; a row's blocks count from its first
        index = generated.long().cumsum(1) - 1
        window = generated & (torch.div(index, self.block_length, rounding_mode="floor") == block[:, None])
        n_masked = (masked & window).sum(1)
        steps_left = per_block - i
        base = torch.div(n_masked + steps_left - 1, steps_left, rounding_mode="floor")  # even, remainder first
        k = torch.tensor(remask_steps(self.k_block if remasking else 0, per_block), device=masked.device)[i]
        closes = steps_left == 1
        if not per_row:  # every row at one step: one window for the batch
            return StepPlan(window, base, remask_count=k, window_closes=bool(closes[0]), window_id=int(block[0]))
        return StepPlan(window, base, remask_count=k, window_closes=closes, window_id=block)

    def first_step_of_next_window(self, step: torch.Tensor, num_steps: int) -> torch.Tensor:
        """[B] long: the first step of the block after each row's current one (num_steps after the last)."""
        per_block = num_steps // self.n_blocks
        return (torch.div(step, per_block, rounding_mode="floor") + 1) * per_block


def blockwise_schedule(sampler_cfg: SamplerConfig, remask_count: str = "fixed") -> BlockwiseSchedule:
    """The blockwise schedule a SamplerConfig describes: the canvas layout when sampler.canvas > 0, else gen_length."""
    s = sampler_cfg
    return BlockwiseSchedule(s.block_length, s.k_block, gen_length=0 if s.canvas else s.gen_length, canvas=s.canvas,
                             remask_count=remask_count)
