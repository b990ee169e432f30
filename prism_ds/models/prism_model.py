"""A backbone f_theta with an optional quality head g_theta: one forward gives logits and quality."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from transformers.utils import ModelOutput

from prism_ds.models.dit import DiT
from prism_ds.models.mdlm import dims_of
from prism_ds.models.quality_heads import QualityHead, build_quality_head


@dataclass
class PrismOutput(ModelOutput):
    """Unmasking logits [B, L, V] (or None) and quality logits [B, L] (or None without a head)."""

    logits: torch.Tensor | None = None
    quality: torch.Tensor | None = None  # [B, computed positions]: all, or the fresh slice of a cached pass
    kv_cache: object | None = None


class PrismModel(nn.Module):
    """Wraps a backbone returning BackboneOutput; the head is optional so plain MDMs use the same class."""

    def __init__(self, backbone: nn.Module, quality_head: QualityHead | None = None):
        super().__init__()
        self.backbone = backbone
        self.quality_head = quality_head

    @property
    def supports_kv_cache(self) -> bool:
        """Whether the backbone can fill and reuse a KV cache, and the head needs no other position's state."""
        return bool(getattr(self.backbone, "supports_kv_cache", False)) and getattr(
            self.quality_head, "per_token", True)

    def forward(self, tokens: torch.Tensor, need_logits: bool = True, need_quality: bool = True,
                attention_mask: torch.Tensor | None = None, logits_cols: torch.Tensor | None = None,
                **cache) -> PrismOutput:
        """One backbone pass; the vocabulary projection is skipped when logits are not needed.

        attention_mask [B, L] (1 = real token) for batches of left-padded prompts; None attends everywhere.
        logits_cols: positions [W] whose logits are wanted (a sampler's current block): logits are then
        [B, W, V], and the vocabulary projection runs on those positions only. Quality covers every position.
        cache: fill_cache=True / kv_cache + fresh=(lo, hi), for backbones with supports_kv_cache.
        """
        out = self.backbone(tokens, need_logits=need_logits, attention_mask=attention_mask, logits_cols=logits_cols,
                            **cache)
        quality = self.quality_head(out) if (need_quality and self.quality_head is not None) else None
        return PrismOutput(logits=out.logits, quality=quality, kv_cache=out.kv_cache)


def dit_dims(model_cfg) -> dict:
    """The DiT's sizes: model.* for kind=dit, the checkpoint's for kind=mdlm (exports record them in meta.json)."""
    if model_cfg.kind == "mdlm":
        d = dims_of(model_cfg.path)
        return {"hidden": d.hidden, "n_blocks": d.n_blocks, "n_heads": d.n_heads, "cond_dim": d.cond_dim,
                "mlp_ratio": 4, "vocab_size": d.vocab_size}
    return {"hidden": model_cfg.hidden, "n_blocks": model_cfg.n_blocks, "n_heads": model_cfg.n_heads,
            "cond_dim": model_cfg.cond_dim, "mlp_ratio": model_cfg.mlp_ratio}


def build_model(model_cfg, head_cfg, vocab_size: int, with_head: bool, mask_id: int | None = None,
                dims: dict | None = None) -> PrismModel:
    """The DiT backbone (sizes from `dims`, else dit_dims(model_cfg); an MDLM checkpoint's weights are loaded
    separately) and the configured quality head when with_head. mask_id turns on SUBS logits.
    Pretrained Hugging Face backbones are built by prism_ds.models.loading.build_pretrained_model."""
    dims = dict(dims or dit_dims(model_cfg))
    if dims.pop("vocab_size", vocab_size) != vocab_size:
        raise ValueError(f"model.path={model_cfg.path}: the checkpoint embeds a different number of tokens than "
                         f"the data's {vocab_size}")
    backbone = DiT(vocab_size=vocab_size, dropout=model_cfg.dropout, mask_id=mask_id,
                   gradient_checkpointing=model_cfg.gradient_checkpointing, use_flash=model_cfg.attention == "flash",
                   **dims)
    head = build_quality_head(head_cfg.kind, dims["hidden"], dims["cond_dim"], n_heads=dims["n_heads"],
                              dropout=model_cfg.dropout) if with_head else None
    return PrismModel(backbone, head)
