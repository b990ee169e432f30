"""Model exports: the trained weights of a stage, loadable without DeepSpeed; and `load_model`.

Layout of an export directory (e.g. <run_dir>/finetune/final):
    backbone.safetensors       f_theta, only when the stage trained all of it (pretraining, unfrozen fine-tuning)
    adapter/                   LoRA adapters in peft's own format (adapter_config.json, adapter_model.safetensors)
    quality_head.safetensors   g_theta's head (absent for a pretrained MDM)
    config.yaml                the resolved RunConfig that built the model
    meta.json                  stage, step, vocab size, parameter counts and `base_backbone`: where the
                               untrained backbone weights come from (a DiT export or a Hugging Face folder)
A frozen backbone is never written again: an 8B base would cost 16 GB per export for no new
information. Exports are gathered from ZeRO-3 partitions one tensor at a time (rank 0 keeps the
copy), written under a temporary name and renamed, so an interrupted export never replaces a complete one.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from prism_ds.config import RunConfig, load_config, save_config


def _gathered_state(module: torch.nn.Module, is_writer: bool, trainable_only: bool = False) -> dict[str, torch.Tensor]:
    """State dict of `module` on the writer (empty elsewhere), gathering ZeRO-3 partitions one tensor at a time."""
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
        _write(path, backbone, head, cfg, meta, (peft_model, adapter) if adapter is not None else None)
    if torch.distributed.is_initialized():  # no rank reads the export before it is complete
        torch.distributed.barrier()
    return path


def _has_lora(model: torch.nn.Module) -> bool:
    return hasattr(getattr(model.backbone, "model", None), "peft_config")


def _write(path: Path, backbone: dict | None, head: dict | None, cfg: RunConfig, meta: dict,
           adapter: tuple | None = None) -> None:
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


def load_weights_into(module: torch.nn.Module, file: Path) -> None:
    """Strictly load a safetensors file into `module`, one tensor at a time (ZeRO-3 partitions included)."""
    with safe_open(str(file), framework="pt") as f:
        _load_tensors(module, set(f.keys()), lambda n: tuple(f.get_slice(n).get_shape()), f.get_tensor, str(file))


def load_state_into(module: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Strictly load an in-memory state dict into `module` (ZeRO-3 partitions included); errors name `source`."""
    _load_tensors(module, set(state), lambda n: tuple(state[n].shape), state.__getitem__, source)


def _load_tensors(module: torch.nn.Module, names: set[str], shape_of, get, source: str) -> None:
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


def load_model(path: str | Path, device: torch.device | str = "cpu", merge_adapter: bool = False,
               trust_remote_code: bool = False):
    """(PrismModel in eval mode, RunConfig) from a prism-ds export or a pretrained Hugging Face folder.

    An export (meta.json) is rebuilt with its head, LoRA adapter and trained weights; a pretrained folder
    (config.json: LLaDA, or any MDM with trust_remote_code) gives the bare backbone. merge_adapter folds
    LoRA into the base weights for faster sampling (logits then match up to rounding).
    """
    from prism_ds.config import RunConfig
    from prism_ds.models.loading import load_pretrained, read_config_json
    from prism_ds.models.backbone import HFBackbone
    from prism_ds.models.prism_model import PrismModel, build_model

    from prism_ds.models import mdlm

    path = Path(path)
    if mdlm.is_mdlm(path):  # a released MDLM folder or .ckpt: the bare DiT with SUBS logits
        cfg = RunConfig(task="packed_text")
        cfg.model.kind, cfg.model.path = "mdlm", str(path)
        dims = mdlm.dims_of(str(path))
        model = build_model(cfg.model, cfg.quality_head, dims.vocab_size, with_head=False, mask_id=dims.vocab_size - 1)
        mdlm.load_into(model.backbone, path, cfg.model.use_ema)
        return model.to(device).eval(), cfg
    if not (path / "meta.json").exists():
        kind = "llada" if read_config_json(path).get("model_type") == "llada" else "hf"
        cfg = RunConfig(task="text")
        cfg.model.kind, cfg.model.path, cfg.model.trust_remote_code = kind, str(path), trust_remote_code
        return PrismModel(HFBackbone(load_pretrained(cfg.model))).to(device).eval(), cfg
    meta = read_meta(path)
    cfg = load_config(str(path / "config.yaml"))
    has_head = (path / "quality_head.safetensors").exists()
    if cfg.model.kind in ("dit", "mdlm"):
        model = build_model(cfg.model, cfg.quality_head, meta["vocab_size"], with_head=has_head,
                            mask_id=meta.get("mask_id"), dims=meta.get("dit"))
        base = meta.get("base_backbone")
        if not (path / "backbone.safetensors").exists() and base and mdlm.is_mdlm(base):
            mdlm.load_into(model.backbone, base, cfg.model.use_ema)  # a frozen MDLM backbone
        else:
            load_backbone(model, path)
    else:
        cfg.model.path = meta.get("base_backbone", cfg.model.path)  # resolved at export time
        base = load_pretrained(cfg.model)
        if "init_backbone" in meta:  # fine-tuned from this run's pretraining of the folder's model
            load_weights_into(HFBackbone(base), Path(meta["init_backbone"]) / "backbone.safetensors")
        if (path / "adapter").exists():
            from peft import PeftModel

            # Adapters in the base's dtype, as trained (loading.add_lora): peft would upcast them to fp32 over a
            # bf16 base, and the reloaded model would no longer compute what the engine computed.
            base = PeftModel.from_pretrained(base, str(path / "adapter"), autocast_adapter_dtype=False)
            base = base.merge_and_unload() if merge_adapter else base
        from prism_ds.models.loading import hidden_size
        from prism_ds.models.quality_heads import build_quality_head

        head = build_quality_head(cfg.quality_head.kind, hidden_size(base.config), None) if has_head else None
        model = PrismModel(HFBackbone(base), head.to(next(base.parameters()).dtype) if head is not None else None)
        if (path / "backbone.safetensors").exists():
            load_weights_into(model.backbone, path / "backbone.safetensors")
    if has_head:
        load_quality_head(model, path)
    return model.to(device).eval(), cfg
