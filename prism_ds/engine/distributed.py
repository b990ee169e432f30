"""Process-group setup and DeepSpeed config resolution.

Started without a launcher, DeepSpeed falls back to MPI discovery and fails, so a single process
gets RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT defaults. Without CUDA the CPU accelerator
and the gloo backend are used.
"""
from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import torch

from prism_ds.config import ConfigError, StageConfig

DS_CONFIGS_DIR = Path(__file__).resolve().parents[2] / "ds_configs"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup_environment() -> None:
    """Fill single-process defaults and pick the CPU accelerator when there is no GPU."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(_free_port())


def init_distributed() -> None:
    """Initialise torch.distributed through DeepSpeed (gloo on CPU, nccl on GPU); idempotent."""
    setup_environment()
    import deepspeed

    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")


def rank() -> int:
    """Global rank (0 before initialisation)."""
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def world_size() -> int:
    """Number of ranks (1 before initialisation)."""
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def barrier() -> None:
    """Wait for every rank (a no-op in a single process without a process group)."""
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def device() -> torch.device:
    """This rank's device."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def resolve_ds_config_path(name: str) -> Path:
    """A file in ds_configs/ by name, or any path."""
    path = Path(name)
    if path.exists():
        return path
    if (DS_CONFIGS_DIR / name).exists():
        return DS_CONFIGS_DIR / name
    raise ConfigError(f"ds_config '{name}' not found (looked at {path} and {DS_CONFIGS_DIR / name})")


def build_ds_config(stage: StageConfig, stage_name: str, n_ranks: int) -> dict:
    """Load the stage's DeepSpeed JSON and fill "auto" batch/clip values from the run config.

    A concrete value that disagrees with the run config is an error naming the JSON key and the
    run-config key, since silently preferring either one trains something other than asked.
    """
    path = resolve_ds_config_path(stage.ds_config)
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: invalid JSON ({exc})") from None
    wanted = {
        "train_micro_batch_size_per_gpu": (stage.micro_batch_size, f"{stage_name}.micro_batch_size"),
        "gradient_accumulation_steps": (stage.grad_accum, f"{stage_name}.grad_accum"),
        "train_batch_size": (stage.micro_batch_size * stage.grad_accum * n_ranks,
                             f"{stage_name}.micro_batch_size x {stage_name}.grad_accum x {n_ranks} ranks"),
        "gradient_clipping": (stage.grad_clip, f"{stage_name}.grad_clip"),
    }
    for key, (value, source) in wanted.items():
        current = cfg.get(key, "auto")
        if current == "auto":
            cfg[key] = value
        elif current != value:
            raise ConfigError(f"{path}: '{key}' is {current} but the run config gives {value} ({source}); "
                              f"set it to \"auto\" or make them agree")
    for key in ("optimizer", "scheduler"):
        if key in cfg:
            raise ConfigError(f"{path}: remove '{key}'; prism-ds builds the optimizer and schedule from the run "
                              f"config ({stage_name}.lr, {stage_name}.lr_schedule, ...)")
    if not torch.cuda.is_available():  # bf16/fp16 need a GPU; CPU ranks train in fp32
        for key in ("bf16", "fp16"):
            if key in cfg:
                cfg[key] = {**cfg[key], "enabled": False}
    return cfg
