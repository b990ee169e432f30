"""Loading models: `load_model` (exports, MDLM checkpoints, pretrained folders) and pretrained Hugging Face folders.

`load_model` rebuilds the model a prism-ds export, an MDLM checkpoint or a pretrained folder describes, ready to
sample; the engine builds its training models from the same pieces (`build_pretrained_model`, mdlm.load_into).

A folder is dispatched on its config.json `model_type`: "llada" loads prism-ds's own LLaDA
(no trust_remote_code); anything else loads through AutoModel with `model.trust_remote_code=true`
and must return logits and hidden states. Before `from_pretrained`, the folder is checked against the
model its config describes: every shard present, every weight name and shape as expected, so a bad
download fails with the file and key instead of loading garbage (transformers' ZeRO-3 path checks
neither).
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
import torch.nn as nn
from peft import LoraConfig as PeftLoraConfig, PeftModel, get_peft_model
from safetensors import safe_open
from transformers import AutoModel
from transformers.integrations import HfDeepSpeedConfig

from prism_ds.config import ConfigError, LoraConfig, ModelConfig, RunConfig, load_config
from prism_ds.devices import uses_cuda
from prism_ds.models import mdlm
from prism_ds.models.backbone import HFBackbone
from prism_ds.models.llada import LLADA_MASK, LLaDAConfig, LLaDAModelLM
from prism_ds.models.prism_model import PrismModel, build_model
from prism_ds.models.quality_heads import build_quality_head
from prism_ds.models.weights import load_backbone, load_quality_head, load_weights_into, read_meta, weight_map


def read_config_json(path: str | Path) -> dict:
    """The folder's config.json as a dict; errors name the folder."""
    file = Path(path) / "config.json"
    if not file.exists():
        raise FileNotFoundError(f"{path}: no config.json (expected a Hugging Face model folder or a prism-ds export)")
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}: invalid JSON ({e})") from None


def check_checkpoint_files(path: str | Path, expected: dict[str, tuple[int, ...]]) -> None:
    """Every expected weight is in the folder's shards with the expected shape, and nothing else is."""
    path = Path(path)
    files = weight_map(path)
    missing, unexpected = sorted(set(expected) - set(files)), sorted(set(files) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{path}: checkpoint names do not match config.json's model (missing {missing[:5]}"
                         f"{' ...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]})")
    by_file: dict[str, list[str]] = {}
    for name, file in files.items():
        by_file.setdefault(file, []).append(name)
    for file, names in sorted(by_file.items()):
        with safe_open(str(path / file), framework="pt") as f:  # reads headers only
            for name in names:
                got = tuple(f.get_slice(name).get_shape())
                if got != tuple(expected[name]):
                    raise ValueError(f"{path / file}: {name} has shape {got} but config.json implies "
                                     f"{tuple(expected[name])}")


def _dtype(name: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if uses_cuda() else torch.float32  # as training: CPU ranks (DS_ACCELERATOR=cpu) fp32
    if name not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"model.dtype={name!r}: expected auto, float32, bfloat16 or float16")
    return getattr(torch, name)


def load_pretrained(model_cfg: ModelConfig, dtype: torch.dtype | None = None) -> nn.Module:
    """The transformers model in `model.path`, checked first; ZeRO-3-partitioned when an HfDeepSpeedConfig is live."""
    path = Path(model_cfg.path).expanduser()
    if not model_cfg.path or not path.is_dir():
        raise ConfigError(f"model.path={model_cfg.path!r}: not a directory (model.kind={model_cfg.kind} loads a "
                          f"pretrained Hugging Face folder)")
    raw = read_config_json(path)
    dtype = dtype or _dtype(model_cfg.dtype)
    if raw.get("model_type") == "llada":
        config = LLaDAConfig.from_pretrained(str(path))
        config.check_supported(str(path / "config.json"))
        with torch.device("meta"):
            shapes = {k: tuple(v.shape) for k, v in LLaDAModelLM(config).state_dict().items()}
        check_checkpoint_files(path, shapes)
        model = LLaDAModelLM.from_pretrained(str(path), config=config, dtype=dtype)
        model.use_flash_attention = model_cfg.attention == "flash"
    elif model_cfg.trust_remote_code:
        model = AutoModel.from_pretrained(str(path), dtype=dtype, trust_remote_code=True)
    else:
        raise ConfigError(f"{path / 'config.json'}: model_type={raw.get('model_type')!r} has no prism-ds "
                          f"implementation; set model.trust_remote_code=true to load the folder's own code")
    if model_cfg.attention not in ("sdpa", "flash"):
        raise ConfigError(f"model.attention={model_cfg.attention!r}: expected 'sdpa' or 'flash'")
    if model_cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def add_lora(model: nn.Module, lora: LoraConfig) -> nn.Module:
    """Wrap with peft LoRA adapters on `lora.target_modules` (base frozen); errors name a missing target."""
    leaves = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    absent = [t for t in lora.target_modules if t not in leaves]
    if absent:
        raise ConfigError(f"lora.target_modules: {absent} not found in {type(model).__name__} "
                          f"(its linear layers include {sorted(n for n in leaves if 'proj' in n or 'out' in n)[:8]})")
    config = PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                            target_modules=list(lora.target_modules), bias="none")
    # Adapters in the base's dtype: peft's default upcasts them to fp32 over a bf16 base, and DeepSpeed's ZeRO-3
    # (which casts no parameter of a zero.Init model) then fails to flatten a mixed bf16/fp32 group; the
    # engine keeps fp32 master weights of them itself.
    return get_peft_model(model, config, autocast_adapter_dtype=False)


def mask_token_id(path: str | Path, tokenizer=None) -> int:
    """config.json's mask_token_id, else the tokenizer's mask token or '<|mdm_mask|>'; an error when neither exists."""
    raw = read_config_json(path)
    if raw.get("mask_token_id") is not None:
        return int(raw["mask_token_id"])
    if tokenizer is not None:
        found = tokenizer.mask_token_id if tokenizer.mask_token_id is not None else tokenizer.get_vocab().get(LLADA_MASK)
        if found is not None:
            return int(found)
    raise ConfigError(f"{Path(path) / 'config.json'}: no mask_token_id, and the tokenizer has neither a mask_token "
                      f"nor a {LLADA_MASK!r} token; a masked diffusion model needs one")


def vocab_size(path: str | Path) -> int:
    """Rows of the model's output projection (embedding_size when the config pads the vocabulary)."""
    raw = read_config_json(path)
    if not (raw.get("embedding_size") or raw.get("vocab_size")):
        raise ValueError(f"{Path(path) / 'config.json'}: no vocab_size (nor embedding_size)")
    return int(raw.get("embedding_size") or raw["vocab_size"])


def hidden_size(config) -> int:
    """Width of the hidden state a quality head reads (d_model for LLaDA, hidden_size for most HF models)."""
    return int(getattr(config, "d_model", None) or config.hidden_size)


def build_pretrained_model(cfg, with_head: bool, train_backbone: bool, ds_config: dict | None = None,
                           init: Path | None = None):
    """PrismModel over `model.path` (+ LoRA when lora.r > 0) with a fresh quality head when with_head.

    Under ZeRO-3 (ds_config stage 3) the weights are loaded partitioned: transformers builds the model
    under deepspeed.zero.Init while an HfDeepSpeedConfig is alive, and rank 0 copies the checkpoint in.
    init: an export whose backbone.safetensors (e.g. this run's pretraining) replaces model.path's weights.
    """
    zero3 = ds_config is not None and ds_config.get("zero_optimization", {}).get("stage", 0) >= 3
    dtype = _dtype(cfg.model.dtype)
    if ds_config is not None:  # the engine's precision decides (build_ds_config made it agree with model.dtype)
        dtype = torch.bfloat16 if ds_config.get("bf16", {}).get("enabled") else torch.float32
    if zero3:
        live = HfDeepSpeedConfig(ds_config)  # noqa: F841 - transformers reads it through a weak reference
    base = load_pretrained(cfg.model, dtype)
    if init is not None:  # before LoRA wraps it, so the names are the backbone's own
        load_weights_into(HFBackbone(base), Path(init) / "backbone.safetensors")
    torch.manual_seed(cfg.seed)  # the same adapters and head on every rank
    if cfg.lora.r > 0:
        if not train_backbone:
            raise ConfigError("lora.r > 0 trains LoRA adapters but finetune.freeze_backbone=true freezes the "
                              "backbone; set one of them (lora.r=0 for a head-only run)")
        base = add_lora(base, cfg.lora)
    else:
        base.requires_grad_(train_backbone)
    head = None
    if with_head:  # zero.Init even when disabled wants a process group, so it is entered only for ZeRO-3
        # deepspeed fixes its accelerator when first imported (DS_ACCELERATOR, which engine.distributed sets for
        # CPU runs), so it is imported at use, never when prism_ds is.
        import deepspeed

        with deepspeed.zero.Init(config_dict_or_path=ds_config) if zero3 else contextlib.nullcontext():
            head = build_quality_head(cfg.quality_head.kind, hidden_size(base.config), None).to(dtype)
    return PrismModel(HFBackbone(base), head)


def load_model(path: str | Path, device: torch.device | str = "cpu", merge_adapter: bool = False,
               trust_remote_code: bool = False) -> tuple[PrismModel, RunConfig]:
    """(PrismModel in eval mode, RunConfig) from a prism-ds export or a pretrained Hugging Face folder.

    An export (meta.json) is rebuilt with its head, LoRA adapter and trained weights; a pretrained folder
    (config.json: LLaDA, or any MDM with trust_remote_code) gives the bare backbone. merge_adapter folds
    LoRA into the base weights for faster sampling (logits then match up to rounding).
    """
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
            # Adapters in the base's dtype, as trained (add_lora): peft would upcast them to fp32 over a bf16
            # base, and the reloaded model would no longer compute what the engine computed.
            base = PeftModel.from_pretrained(base, str(path / "adapter"), autocast_adapter_dtype=False)
            base = base.merge_and_unload() if merge_adapter else base
        head = build_quality_head(cfg.quality_head.kind, hidden_size(base.config), None) if has_head else None
        model = PrismModel(HFBackbone(base), head.to(next(base.parameters()).dtype) if head is not None else None)
        if (path / "backbone.safetensors").exists():
            load_weights_into(model.backbone, path / "backbone.safetensors")
    if has_head:
        load_quality_head(model, path)
    return model.to(device).eval(), cfg
