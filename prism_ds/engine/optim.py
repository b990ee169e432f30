"""Optimizer and LR schedule of a stage: AdamW over parameter groups, warmup, (cosine) schedules.

Groups: the backbone (or its LoRA adapters) at `lr` and the quality head at `head_lr`. Frozen
parameters are never handed to the optimizer, so they carry no optimizer state.
"""
from __future__ import annotations

import math

import torch
from transformers import get_scheduler

from prism_ds.config import ConfigError, StageConfig

GROUPS = ("backbone", "quality_head")


def param_groups(model: torch.nn.Module, stage: StageConfig) -> list[dict]:
    """AdamW groups of the trainable parameters, named so TensorBoard can log each group's lr."""
    groups = []
    for name in GROUPS:
        module = getattr(model, name, None)
        params = [p for p in module.parameters() if p.requires_grad] if module is not None else []
        if params:
            lr = stage.head_lr if (name == "quality_head" and stage.head_lr > 0) else stage.lr
            groups.append({"name": name, "params": params, "lr": lr, "weight_decay": stage.weight_decay})
    if not groups:
        raise ConfigError("nothing to train: every parameter is frozen")
    return groups


def _offloads_optimizer(ds_config: dict) -> bool:
    offload = ds_config.get("zero_optimization", {}).get("offload_optimizer", {})
    return offload.get("device", "none") not in ("none", None)


def build_optimizer(model: torch.nn.Module, stage: StageConfig, ds_config: dict) -> torch.optim.Optimizer:
    """AdamW; DeepSpeed's CPU Adam when the DS config offloads the optimizer (its fast path for offload)."""
    groups = param_groups(model, stage)
    if _offloads_optimizer(ds_config):
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=stage.lr, betas=tuple(stage.betas), weight_decay=stage.weight_decay,
                                adamw_mode=True)
    return torch.optim.AdamW(groups, lr=stage.lr, betas=tuple(stage.betas), weight_decay=stage.weight_decay)


def warmup_steps(stage: StageConfig, stage_name: str) -> int:
    """Warmup length from warmup_steps or warmup_ratio (setting both is ambiguous, so it is an error)."""
    if stage.warmup_steps and stage.warmup_ratio:
        raise ConfigError(f"{stage_name}.warmup_steps={stage.warmup_steps} and {stage_name}.warmup_ratio="
                          f"{stage.warmup_ratio} are both set; use one")
    if not 0 <= stage.warmup_ratio < 1:
        raise ConfigError(f"{stage_name}.warmup_ratio={stage.warmup_ratio} must be in [0, 1)")
    return stage.warmup_steps or math.ceil(stage.warmup_ratio * stage.steps)


CYCLE_SCHEDULES = ("cosine", "cosine_with_restarts")  # the get_scheduler names that take num_cycles


def build_scheduler(optimizer: torch.optim.Optimizer, stage: StageConfig, stage_name: str):
    """transformers.get_scheduler by name; the cosine schedules get lr_cycles as num_cycles when it is set."""
    if stage.lr_cycles < 0 or (stage.lr_cycles and stage.lr_schedule not in CYCLE_SCHEDULES):
        raise ConfigError(f"{stage_name}.lr_cycles={stage.lr_cycles} must be >= 0 and only applies to "
                          f"lr_schedule={' or '.join(CYCLE_SCHEDULES)} (got {stage.lr_schedule}); 0 = the "
                          f"schedule's default")
    # 0 leaves HF's default (cosine: half a period, cosine_with_restarts: one cycle) rather than passing it.
    extra = {"num_cycles": stage.lr_cycles} if stage.lr_cycles else {}
    try:
        return get_scheduler(stage.lr_schedule, optimizer, num_warmup_steps=warmup_steps(stage, stage_name),
                             num_training_steps=stage.steps, scheduler_specific_kwargs=extra)
    except ValueError as exc:
        raise ConfigError(f"{stage_name}.lr_schedule={stage.lr_schedule!r}: {exc}") from None
