"""LLaDA's semi-autoregressive blockwise schedule with K_block remasks per block (paper appendix D.6).

The generated region [gen_start, gen_start + gen_length) is cut into blocks of block_length decoded
left to right; the steps are split evenly over the blocks. Inside a block the unmask counts are spread
evenly (remainder first, as LLaDA's sampler) and the block's K_block remasks go to the steps nearest
the block's middle (never its first step, which has nothing to remask, nor its last, which must fill
the block). Only the current block's positions may change. Every row shares the block boundaries:
batched prompts are left-padded, so generation starts at the same position in every row.
"""
from __future__ import annotations

import torch

from prism_ds.core.schedules import Schedule, StepPlan


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
    """Blocks of block_length left to right, num_steps / n_blocks steps each, K_block remasks per block."""

    def __init__(self, gen_start: int, gen_length: int, block_length: int, k_block: int = 0,
                 remask_count: str = "fixed"):
        if gen_length < 1 or block_length < 1 or gen_length % block_length:
            raise ValueError(f"sampler.block_length={block_length} must divide sampler.gen_length={gen_length}")
        if k_block < 0:
            raise ValueError(f"sampler.k_block={k_block} must be >= 0")
        if remask_count != "fixed":
            raise ValueError(f"the blockwise sampler remasks a fixed K_block per block; sampler.remask_count="
                             f"{remask_count!r} is only for the even schedule")
        self.gen_start, self.gen_length, self.block_length, self.k_block = gen_start, gen_length, block_length, k_block
        self.n_blocks = gen_length // block_length

    def steps_per_block(self, num_steps: int) -> int:
        """Steps each block gets; num_steps must be a multiple of the number of blocks."""
        if num_steps < self.n_blocks or num_steps % self.n_blocks:
            raise ValueError(f"sampler steps={num_steps} must be a multiple of the number of blocks "
                             f"({self.gen_length} / {self.block_length} = {self.n_blocks})")
        per_block = num_steps // self.n_blocks
        if self.k_block and per_block < 3:
            raise ValueError(f"sampler.k_block={self.k_block} needs at least 3 steps per block (the first has nothing "
                             f"to remask, the last must fill the block); steps={num_steps} gives {per_block}")
        return per_block

    def plan(self, step: int, num_steps: int, masked: torch.Tensor, clean: torch.Tensor, target: torch.Tensor,
             remasking: bool, generator: torch.Generator | None = None) -> StepPlan:
        per_block = self.steps_per_block(num_steps)
        block, i = divmod(step, per_block)
        lo = self.gen_start + block * self.block_length
        window = torch.zeros_like(masked)
        window[:, lo:lo + self.block_length] = True
        n_masked = (masked & window).sum(1)
        steps_left = per_block - i
        base = torch.div(n_masked + steps_left - 1, steps_left, rounding_mode="floor")  # even, remainder first
        k = remask_steps(self.k_block, per_block)[i] if remasking else 0
        return StepPlan(window, base, remask_count=torch.full_like(base, k), window_closes=steps_left == 1)
