"""Model checkpoints: backbone and quality head saved separately (safetensors) with the run config.

Layout of a checkpoint directory:
    backbone.safetensors       the MDM f_theta
    quality_head.safetensors   g_theta's head (absent for a pretrained MDM)
    config.yaml                the resolved RunConfig that built the model
    meta.json                  stage, step, parameter counts
Directories are written under a temporary name and renamed, so an interrupted save never replaces
the last complete checkpoint.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from prism_ds.config import RunConfig, load_config, save_config


def _gathered_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Full state dict of `module`, gathering ZeRO-3 partitions when present (a no-op otherwise)."""
    import deepspeed

    params = [p for p in module.parameters() if hasattr(p, "ds_id")]
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None, enabled=bool(params)):
        return {k: v.detach().cpu().clone().contiguous() for k, v in module.state_dict().items()}


def save_checkpoint(model: torch.nn.Module, cfg: RunConfig, path: str | Path, meta: dict, is_writer: bool) -> Path:
    """Save backbone/head weights of `model` (a PrismModel) to `path`; every rank must call it under ZeRO-3."""
    path = Path(path)
    backbone = _gathered_state(model.backbone)
    head = _gathered_state(model.quality_head) if model.quality_head is not None else None
    if is_writer:
        _write(path, backbone, head, cfg, meta)
    if torch.distributed.is_initialized():  # no rank reads the checkpoint before it is complete
        torch.distributed.barrier()
    return path


def _write(path: Path, backbone: dict, head: dict | None, cfg: RunConfig, meta: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(backbone, str(tmp / "backbone.safetensors"))
    if head is not None:
        save_file(head, str(tmp / "quality_head.safetensors"))
    save_config(cfg, tmp / "config.yaml")
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    old = path.with_name(path.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if path.exists():
        path.rename(old)
    tmp.rename(path)
    shutil.rmtree(old, ignore_errors=True)


def _check_dir(path: Path) -> None:
    if not (path / "backbone.safetensors").exists():
        raise FileNotFoundError(f"{path}: not a prism-ds checkpoint (no backbone.safetensors)")


def load_backbone(model: torch.nn.Module, path: str | Path) -> None:
    """Load backbone weights from a checkpoint into model.backbone (strict: names and shapes must match)."""
    path = Path(path)
    _check_dir(path)
    state = load_file(str(path / "backbone.safetensors"))
    try:
        model.backbone.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"{path}/backbone.safetensors does not fit this model.* config: {exc}") from None


def load_quality_head(model: torch.nn.Module, path: str | Path) -> None:
    """Load the quality head from a checkpoint into model.quality_head."""
    path = Path(path) / "quality_head.safetensors"
    if not path.exists():
        raise FileNotFoundError(f"{path} missing: this checkpoint has no quality head (a pretrain checkpoint?)")
    model.quality_head.load_state_dict(load_file(str(path)), strict=True)


def load_model(path: str | Path, device: torch.device | str = "cpu"):
    """Rebuild a PrismModel (with its head when saved) from a checkpoint directory, without DeepSpeed."""
    from prism_ds.models.prism_model import build_model
    from prism_ds.sudoku.board import BoardSpec

    path = Path(path)
    _check_dir(path)
    cfg = load_config(str(path / "config.yaml"))
    has_head = (path / "quality_head.safetensors").exists()
    spec = BoardSpec(cfg.data.box_rows, cfg.data.box_cols)
    model = build_model(cfg.model, cfg.quality_head, spec.vocab_size, with_head=has_head)
    load_backbone(model, path)
    if has_head:
        load_quality_head(model, path)
    return model.to(device).eval(), cfg


def read_meta(path: str | Path) -> dict:
    """The checkpoint's meta.json."""
    return json.loads((Path(path) / "meta.json").read_text())
