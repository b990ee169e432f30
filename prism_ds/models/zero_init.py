"""Zero-initialisation that survives DeepSpeed ZeRO-3's zero.Init.

Under zero.Init a layer's parameters are partitioned as soon as its own constructor returns, so a
parent's `nn.init.zeros_(child.weight)` would act on an empty shard and leave the random init in place.
"""
from __future__ import annotations

import torch
import torch.nn as nn


def zeros_(*params: torch.nn.Parameter) -> None:
    """Set parameters to zero, gathering them first when ZeRO-3 has partitioned them."""
    partitioned = [p for p in params if hasattr(p, "ds_id")]
    if not partitioned:
        for p in params:
            nn.init.zeros_(p)
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=0):
        for p in params:
            nn.init.zeros_(p)
