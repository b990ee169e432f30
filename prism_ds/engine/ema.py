"""Exponential moving average of the weights, kept in fp32.

Under bf16 training an EMA stored in bf16 barely moves: with decay 0.9999 the update (1 - decay) * diff
is below bf16's resolution for most weights. The shadow copy is therefore fp32, updated with lerp.
"""
from __future__ import annotations

import copy

import torch


class EMA:
    """An fp32 shadow copy of a module (ZeRO <= 2: the module's parameters are whole on every rank)."""

    def __init__(self, module: torch.nn.Module, decay: float):
        self.decay = decay
        self.module = copy.deepcopy(module).float().eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        """shadow <- decay * shadow + (1 - decay) * current."""
        for shadow, current in zip(self.module.parameters(), module.parameters()):
            shadow.lerp_(current.detach().float(), 1.0 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The fp32 shadow weights (saved with DeepSpeed checkpoints for exact resume)."""
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore shadow weights saved by state_dict."""
        self.module.load_state_dict(state)
