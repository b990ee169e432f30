"""A backbone f_theta with an optional quality head g_theta: one forward gives logits and quality."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from transformers.utils import ModelOutput

from prism_ds.models.dit import DiT
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


def build_model(model_cfg, head_cfg, vocab_size: int, with_head: bool, mask_id: int | None = None) -> PrismModel:
    """The DiT backbone (sizes from model.*, or from the MDLM checkpoint at model.path for kind=mdlm; its weights
    are loaded separately) and the configured quality head when with_head. mask_id turns on SUBS logits.
    Pretrained Hugging Face backbones are built by prism_ds.models.loading.build_pretrained_model."""
    dims = (model_cfg.hidden, model_cfg.n_blocks, model_cfg.n_heads, model_cfg.cond_dim, model_cfg.mlp_ratio)
    if model_cfg.kind == "mdlm":
        from prism_ds.models.mdlm import dims_of

        d = dims_of(model_cfg.path)
        if d.vocab_size != vocab_size:
            raise ValueError(f"model.path={model_cfg.path}: the checkpoint embeds {d.vocab_size} tokens, the data "
                             f"{vocab_size}")
        dims = (d.hidden, d.n_blocks, d.n_heads, d.cond_dim, 4)
    hidden, n_blocks, n_heads, cond_dim, mlp_ratio = dims
    backbone = DiT(vocab_size=vocab_size, hidden=hidden, n_blocks=n_blocks, n_heads=n_heads, cond_dim=cond_dim,
                   mlp_ratio=mlp_ratio, dropout=model_cfg.dropout, mask_id=mask_id,
                   gradient_checkpointing=model_cfg.gradient_checkpointing, use_flash=model_cfg.attention == "flash")
    head = build_quality_head(head_cfg.kind, hidden, cond_dim, n_heads=n_heads,
                              dropout=model_cfg.dropout) if with_head else None
    return PrismModel(backbone, head)
