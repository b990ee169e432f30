"""Process-group setup and DeepSpeed config resolution.

Started without a launcher, DeepSpeed falls back to MPI discovery and fails, so a single process
gets RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT defaults. Without CUDA (or with DS_ACCELERATOR=cpu)
the CPU accelerator, CPU tensors and the gloo backend are used.
"""
from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import torch

from prism_ds.config import ConfigError, StageConfig
from prism_ds.devices import uses_cuda  # noqa: F401 - also the engine's public device rule

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

    if uses_cuda():
        # Before any collective: NCCL barriers and broadcast_object_list run on the *current* device, which is
        # GPU 0 on every rank until set (DeepSpeed sets it only inside deepspeed.initialize).
        torch.cuda.set_device(device())
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if uses_cuda() else "gloo")


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
    """This rank's device (the CPU when DS_ACCELERATOR=cpu, even on a GPU host: DeepSpeed's engine is there)."""
    if uses_cuda():
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


def build_ds_config(stage: StageConfig, stage_name: str, n_ranks: int, model_dtype: str = "auto") -> dict:
    """Load the stage's DeepSpeed JSON, fill "auto" batch/clip values from the run config, and make its
    bf16/fp16 blocks agree with model.dtype (see _apply_model_dtype).

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
    _apply_model_dtype(cfg, model_dtype, path, stage_name)
    return cfg


# model.dtype -> the DeepSpeed block that trains in it (float32: neither bf16 nor fp16 enabled).
_PRECISION_BLOCK = {"float32": None, "bfloat16": "bf16", "float16": "fp16"}


def _apply_model_dtype(cfg: dict, model_dtype: str, path: Path, stage_name: str) -> None:
    """The one precision rule, the same on CPU and GPU: model.dtype says what the engine trains in.

    auto      the DS config decides on GPU; a CPU rank trains fp32 (bf16/fp16 switched off), so every recipe's
              CPU run stays what it was;
    float32   bf16/fp16 switched off, on GPU too (switching a block off needs none of its options);
    bfloat16, float16
              the DS config must enable that block and not the other, on CPU too (DeepSpeed's CPU accelerator
              trains bf16 under gloo, which is how CI exercises the GPU dtype path); otherwise a ConfigError
              names both settings: switching a block on silently would skip the options (loss scaling, ...)
              its author chose, and the two settings contradict each other.
    """
    enabled = {key for key in ("bf16", "fp16") if cfg.get(key, {}).get("enabled")}
    if model_dtype == "auto":
        off = () if uses_cuda() else ("bf16", "fp16")  # CPU ranks, also on a GPU host under DS_ACCELERATOR=cpu
    elif model_dtype == "float32":
        off = ("bf16", "fp16")
    elif model_dtype in _PRECISION_BLOCK:
        want = _PRECISION_BLOCK[model_dtype]
        if enabled != {want}:
            has = (" and ".join(f'"{k}"' for k in sorted(enabled)) + " enabled") if enabled else \
                "neither bf16 nor fp16 enabled"
            raise ConfigError(f"model.dtype={model_dtype} contradicts {stage_name}.ds_config={path} ({has}); "
                              f'enable "{want}" there (and only it), or set model.dtype=auto or float32')
        off = ()
    else:
        raise ConfigError(f"model.dtype={model_dtype!r}: expected auto, float32, bfloat16 or float16")
    for key in off:
        if key in cfg:
            cfg[key] = {**cfg[key], "enabled": False}
