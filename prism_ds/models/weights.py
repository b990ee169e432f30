"""Weight files: safetensors into and out of (ZeRO-3-partitioned) modules, and the export folder format.

Layout of an export directory (e.g. <run_dir>/finetune/final), written by engine/checkpoint.py:
    backbone.safetensors       f_theta, only when the stage trained all of it (pretraining, unfrozen fine-tuning)
    adapter/                   LoRA adapters in peft's own format (adapter_config.json, adapter_model.safetensors)
    quality_head.safetensors   g_theta's head (absent for a pretrained MDM)
    config.yaml                the resolved RunConfig that built the model
    meta.json                  stage, step, vocab size, parameter counts and `base_backbone`: where the
                               untrained backbone weights come from (a DiT export or a Hugging Face folder)
This module knows files and modules only, never which model classes exist, so that both the models (an MDLM
checkpoint or an `init` export copied into a freshly built backbone) and the engine (exports, the critic stage)
read and write weights through it without importing each other. Rebuilding a whole model from a folder is
models/loading.py's `load_model`.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from prism_ds.config import RunConfig, save_config

SAFETENSORS_INDEX = "model.safetensors.index.json"


def write_export(path: Path, backbone: dict | None, head: dict | None, cfg: RunConfig, meta: dict,
                 adapter: tuple | None = None) -> None:
    """Write an export folder: under a temporary name, then renamed, so an interrupted write never replaces
    a complete export. adapter: (peft model, its gathered state) written in peft's own format."""
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if backbone is not None:
        save_file(backbone, str(tmp / "backbone.safetensors"))
    if adapter is not None:  # peft's own format, from the gathered tensors (peft keeps only the lora_ ones)
        peft_model, state = adapter
        peft_model.save_pretrained(str(tmp / "adapter"), state_dict=state, safe_serialization=True)
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


def content_hash(files: list[Path], extra: str = "") -> str:
    """A short sha256 of files' names and bytes (and `extra`): what identifies a checkpoint's content."""
    h = hashlib.sha256(extra.encode())
    for file in files:
        h.update(Path(file).name.encode())
        with open(file, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


def read_meta(path: str | Path) -> dict:
    """The export's meta.json."""
    meta = Path(path) / "meta.json"
    if not meta.exists():
        raise FileNotFoundError(f"{path}: not a prism-ds export (no meta.json)")
    return json.loads(meta.read_text())


def backbone_file(path: str | Path) -> Path:
    """The DiT backbone weights an export uses: its own, or those of its base when the backbone was frozen."""
    path = Path(path)
    own = path / "backbone.safetensors"
    if own.exists():
        return own
    base = read_meta(path).get("base_backbone")
    if base is None:
        raise FileNotFoundError(f"{path}: no backbone.safetensors and no base_backbone in meta.json")
    return backbone_file(base)


def weight_map(path: str | Path) -> dict[str, str]:
    """{weight name: file} of a Hugging Face folder: its safetensors index, or a single model.safetensors."""
    path = Path(path)
    index = path / SAFETENSORS_INDEX
    if index.exists():
        try:
            names = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{index}: not a safetensors index (expected JSON with a 'weight_map'; {e!r})") from None
        missing = sorted({f for f in names.values() if not (path / f).exists()})
        if missing:
            raise FileNotFoundError(f"{path}: shard(s) listed in {SAFETENSORS_INDEX} are missing: {', '.join(missing)}")
        return names
    single = path / "model.safetensors"
    if single.exists():
        with safe_open(str(single), framework="pt") as f:
            return {k: single.name for k in f.keys()}
    raise FileNotFoundError(f"{path}: no {SAFETENSORS_INDEX} and no model.safetensors (only safetensors "
                            f"checkpoints are read)")


def load_weights_into(module: torch.nn.Module, file: Path) -> None:
    """Strictly load a safetensors file into `module`, one tensor at a time (ZeRO-3 partitions included)."""
    with safe_open(str(file), framework="pt") as f:
        _load_tensors(module, set(f.keys()), lambda n: tuple(f.get_slice(n).get_shape()), f.get_tensor, str(file))


def load_state_into(module: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Strictly load an in-memory state dict into `module` (ZeRO-3 partitions included); errors name `source`."""
    _load_tensors(module, set(state), lambda n: tuple(state[n].shape), state.__getitem__, source)


def _load_tensors(module: torch.nn.Module, names: set[str], shape_of: Callable[[str], tuple],
                  get: Callable[[str], torch.Tensor], source: str) -> None:
    # deepspeed fixes its accelerator when first imported (DS_ACCELERATOR, which engine.distributed sets for CPU
    # runs), so it is imported at use, never when prism_ds is.
    import deepspeed

    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    own = dict(module.named_parameters()) | dict(module.named_buffers())
    persistent = set(module.state_dict().keys())
    missing, unexpected = sorted(persistent - names), sorted(names - persistent)
    if missing or unexpected:
        raise ValueError(f"{source} does not fit this model.* config (missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]})")
    # Every rank checks every shape before the first gather, so no rank raises while others wait in one.
    for name in sorted(persistent):
        want, got = tuple(getattr(own[name], "ds_shape", own[name].shape)), shape_of(name)
        if want != got:
            raise ValueError(f"{source}: {name} has shape {got} but this model.* config builds {want}")
    for name in sorted(persistent):
        target = own[name]
        partitioned = hasattr(target, "ds_id")
        # Gather one tensor at a time so no rank ever holds the whole model; rank 0 writes it.
        with deepspeed.zero.GatheredParameters([target], modifier_rank=0, enabled=partitioned):
            if partitioned and rank != 0:
                continue
            with torch.no_grad():
                target.copy_(get(name))


def load_backbone(model: torch.nn.Module, path: str | Path) -> None:
    """Load backbone weights from an export into model.backbone (names and shapes must match)."""
    load_weights_into(model.backbone, backbone_file(path))


def load_quality_head(model: torch.nn.Module, path: str | Path) -> None:
    """Load the quality head from an export into model.quality_head."""
    file = Path(path) / "quality_head.safetensors"
    if not file.exists():
        raise FileNotFoundError(f"{file} missing: this export has no quality head (a pretrain export?)")
    load_weights_into(model.quality_head, file)
