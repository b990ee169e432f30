"""Exponential moving average of the weights, kept in fp32, with MDLM's warm-up.

Under bf16 training an EMA stored in bf16 barely moves: with decay 0.9999 the update (1 - decay) * diff
is below bf16's resolution for most weights. The shadow copy is therefore fp32, updated with lerp.
The n-th update uses decay min(decay, (1 + n) / (10 + n)), as the EMA of MDLM, ReMDM and the PRISM authors
(models/ema.py): without it a 0.9999 average of a 10k-step fine-tune would still weigh its starting point
(a zero-initialised head) by 0.9999^10000 = 0.37. With it the average covers about the last tenth of the
updates until n reaches 90k.
"""
from __future__ import annotations

import copy

import torch


class EMA:
    """An fp32 shadow copy of a module (ZeRO <= 2: the module's parameters are whole on every rank).

    Every parameter is averaged: the backbone (when it trains), LoRA adapters and the quality head; frozen ones
    stay equal to their live copies. The trainer exports the shadow, so `final/` holds the EMA weights.
    """

    def __init__(self, module: torch.nn.Module, decay: float):
        self.decay, self.updates = decay, 0
        # requires_grad is kept as in the live module: the export picks LoRA adapters out of the frozen base by it
        # (with every flag off it wrote an empty adapter). The shadow is in no optimizer and only updated under
        # no_grad, so the flags cost nothing.
        self.module = copy.deepcopy(module).float().eval()

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        """shadow <- d * shadow + (1 - d) * current, d = min(decay, (1 + n) / (10 + n)) at the n-th update."""
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for shadow, current in zip(self.module.parameters(), module.parameters()):
            shadow.lerp_(current.detach().float(), 1.0 - decay)

    def state_dict(self) -> dict:
        """The fp32 shadow weights and the update count (saved with DeepSpeed checkpoints for exact resume)."""
        return {"shadow": self.module.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        """Restore what state_dict saved. A checkpoint from before the warm-up holds the shadow alone: its run
        continues with the plain decay (an update count past the warm-up)."""
        if "shadow" not in state:
            state = {"shadow": state, "updates": 10 ** 9}
        self.module.load_state_dict(state["shadow"])
        self.updates = state["updates"]
