"""Model exports: the trainable weights of a stage as safetensors, loadable without DeepSpeed.

Layout of an export directory (e.g. <run_dir>/finetune/final):
    backbone.safetensors       f_theta, only when the stage trained it (pretraining, unfrozen fine-tuning)
    quality_head.safetensors   g_theta's head (absent for a pretrained MDM)
    config.yaml                the resolved RunConfig that built the model
    meta.json                  stage, step, vocab size, parameter counts and, when the backbone was
                               frozen, `base_backbone`: the export its weights come from
A frozen backbone is never written again: an 8B base would cost 16 GB per export for no new
information. Exports are gathered from ZeRO-3 partitions one tensor at a time (rank 0 keeps the
copy), written under a temporary name and renamed, so an interrupted export never replaces a complete one.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from prism_ds.config import RunConfig, load_config, save_config


def _gathered_state(module: torch.nn.Module, is_writer: bool) -> dict[str, torch.Tensor]:
    """State dict of `module` on the writer (empty elsewhere), gathering ZeRO-3 partitions one tensor at a time."""
    import deepspeed

    out = {}
    for name, tensor in module.state_dict(keep_vars=True).items():
        # keep_vars gives the Parameter objects, whose data is the full tensor inside the gather.
        with deepspeed.zero.GatheredParameters([tensor], modifier_rank=None, enabled=hasattr(tensor, "ds_id")):
            if is_writer:
                out[name] = tensor.detach().cpu().float().clone().contiguous()
    return out


def export_trainable(model: torch.nn.Module, cfg: RunConfig, path: str | Path, meta: dict, is_writer: bool,
                     base_backbone: str | Path | None = None) -> Path:
    """Export the trained parts of a PrismModel to `path`; every rank must call it under ZeRO-3.

    base_backbone: for a frozen backbone, the export its weights come from (they are not written again).
    Weights are saved in fp32 (bf16 training weights are upcast).
    """
    path = Path(path)
    backbone = _gathered_state(model.backbone, is_writer) if base_backbone is None else None
    head = _gathered_state(model.quality_head, is_writer) if model.quality_head is not None else None
    if base_backbone is not None:
        meta = {**meta, "base_backbone": str(Path(base_backbone).resolve())}
    if is_writer:
        _write(path, backbone, head, cfg, meta)
    if torch.distributed.is_initialized():  # no rank reads the export before it is complete
        torch.distributed.barrier()
    return path


def _write(path: Path, backbone: dict | None, head: dict | None, cfg: RunConfig, meta: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if backbone is not None:
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


def read_meta(path: str | Path) -> dict:
    """The export's meta.json."""
    meta = Path(path) / "meta.json"
    if not meta.exists():
        raise FileNotFoundError(f"{path}: not a prism-ds export (no meta.json)")
    return json.loads(meta.read_text())


def backbone_file(path: str | Path) -> Path:
    """The backbone weights an export uses: its own, or those of its base when the backbone was frozen."""
    path = Path(path)
    own = path / "backbone.safetensors"
    if own.exists():
        return own
    base = read_meta(path).get("base_backbone")
    if base is None:
        raise FileNotFoundError(f"{path}: no backbone.safetensors and no base_backbone in meta.json")
    return backbone_file(base)


def _load_into(module: torch.nn.Module, file: Path) -> None:
    """Strictly load a safetensors file into `module`, one tensor at a time (ZeRO-3 partitions included)."""
    import deepspeed

    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    with safe_open(str(file), framework="pt") as f:
        names = set(f.keys())
        own = dict(module.named_parameters()) | dict(module.named_buffers())
        persistent = set(module.state_dict().keys())
        missing, unexpected = sorted(persistent - names), sorted(names - persistent)
        if missing or unexpected:
            raise ValueError(f"{file} does not fit this model.* config (missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]})")
        # Every rank checks every shape before the first gather, so no rank raises while others wait in one.
        for name in sorted(persistent):
            want, got = tuple(getattr(own[name], "ds_shape", own[name].shape)), tuple(f.get_slice(name).get_shape())
            if want != got:
                raise ValueError(f"{file}: {name} has shape {got} but this model.* config builds {want}")
        for name in sorted(persistent):
            target = own[name]
            partitioned = hasattr(target, "ds_id")
            # Gather one tensor at a time so no rank ever holds the whole model; rank 0 writes it.
            with deepspeed.zero.GatheredParameters([target], modifier_rank=0, enabled=partitioned):
                if partitioned and rank != 0:
                    continue
                value = f.get_tensor(name)
                with torch.no_grad():
                    target.copy_(value)


def load_backbone(model: torch.nn.Module, path: str | Path) -> None:
    """Load backbone weights from an export into model.backbone (names and shapes must match)."""
    _load_into(model.backbone, backbone_file(path))


def load_quality_head(model: torch.nn.Module, path: str | Path) -> None:
    """Load the quality head from an export into model.quality_head."""
    file = Path(path) / "quality_head.safetensors"
    if not file.exists():
        raise FileNotFoundError(f"{file} missing: this export has no quality head (a pretrain export?)")
    _load_into(model.quality_head, file)


def load_model(path: str | Path, device: torch.device | str = "cpu"):
    """Rebuild a PrismModel (with its head when saved) from an export directory, without DeepSpeed."""
    from prism_ds.models.prism_model import build_model

    path = Path(path)
    meta = read_meta(path)
    cfg = load_config(str(path / "config.yaml"))
    has_head = (path / "quality_head.safetensors").exists()
    model = build_model(cfg.model, cfg.quality_head, meta["vocab_size"], with_head=has_head)
    load_backbone(model, path)
    if has_head:
        load_quality_head(model, path)
    return model.to(device).eval(), cfg
