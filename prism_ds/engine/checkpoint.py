"""Model exports: gather the trained weights of a stage from DeepSpeed (ZeRO-3 included) and write them.

What an export holds and how its files are read back is models/weights.py (the folder format) and
models/loading.py (`load_model`). A frozen backbone is never written again: an 8B base would cost 16 GB per
export for no new information. Exports are gathered from ZeRO-3 partitions one tensor at a time (rank 0 keeps
the copy) and written by `write_export` under a temporary name, so an interrupted export never replaces a
complete one.
"""
from __future__ import annotations

from pathlib import Path

import torch

from prism_ds.config import RunConfig
from prism_ds.models.weights import write_export


def _gathered_state(module: torch.nn.Module, is_writer: bool, trainable_only: bool = False) -> dict[str, torch.Tensor]:
    """State dict of `module` on the writer (empty elsewhere), gathering ZeRO-3 partitions one tensor at a time."""
    # deepspeed fixes its accelerator when first imported (DS_ACCELERATOR, which engine.distributed sets for CPU
    # runs), so it is imported at use, never when prism_ds is.
    import deepspeed

    out = {}
    items = (module.named_parameters() if trainable_only else module.state_dict(keep_vars=True).items())
    for name, tensor in items:
        if trainable_only and not tensor.requires_grad:
            continue
        # keep_vars gives the Parameter objects, whose data is the full tensor inside the gather.
        with deepspeed.zero.GatheredParameters([tensor], modifier_rank=None, enabled=hasattr(tensor, "ds_id")):
            if is_writer:
                out[name] = tensor.detach().cpu().float().clone().contiguous()
    return out


def export_trainable(model: torch.nn.Module, cfg: RunConfig, path: str | Path, meta: dict, is_writer: bool,
                     base_backbone: str | Path | None = None, backbone_trained: bool | None = None) -> Path:
    """Export the trained parts of a PrismModel to `path`; every rank must call it under ZeRO-3.

    base_backbone: where the backbone's starting weights live (a DiT export or a Hugging Face folder);
    backbone_trained: write the whole backbone (default: when there is no base). LoRA adapters are
    written in peft's format instead. Weights are saved in fp32 (bf16 training weights are upcast).
    """
    if backbone_trained is None:
        backbone_trained = base_backbone is None
    path = Path(path)
    peft_model = getattr(model.backbone, "model", None) if _has_lora(model) else None
    adapter = _gathered_state(peft_model, is_writer, trainable_only=True) if peft_model is not None else None
    backbone = _gathered_state(model.backbone, is_writer) if backbone_trained and adapter is None else None
    head = _gathered_state(model.quality_head, is_writer) if model.quality_head is not None else None
    if base_backbone is not None:
        meta = {**meta, "base_backbone": str(Path(base_backbone).resolve())}
    if is_writer:
        write_export(path, backbone, head, cfg, meta, (peft_model, adapter) if adapter is not None else None)
    if torch.distributed.is_initialized():  # no rank reads the export before it is complete
        torch.distributed.barrier()
    return path


def _has_lora(model: torch.nn.Module) -> bool:
    return hasattr(getattr(model.backbone, "model", None), "peft_config")
