"""The one backbone interface: token ids in, unmasking logits and the hidden state heads read out.

    backbone(tokens, need_logits=True, attention_mask=None, logits_cols=None) -> BackboneOutput
    backbone.supports_kv_cache (optional): passes can then fill a KV cache and recompute a slice only

prism-ds's DiT implements it directly. `HFBackbone` adapts any Hugging Face masked diffusion model:
prism-ds's LLaDA (which can skip the vocabulary projection when only the quality head is needed),
or any other model that returns `logits` and `hidden_states` (e.g. loaded with trust_remote_code).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from transformers.utils import ModelOutput

from prism_ds.models.llada import LLaDAModelLM


@dataclass
class BackboneOutput(ModelOutput):
    """What a backbone hands to the unmasking head's consumers and to any quality head.

    A transformers ModelOutput (a dict) so DeepSpeed ZeRO-3 finds the tensors in it for its backward hooks.
    """

    logits: torch.Tensor | None = None  # [B, L, V]; None when the caller asked for hidden states only
    last_hidden: torch.Tensor | None = None  # [B, L, H] what quality heads read (DiT: last block; LLaDA: post-ln_f)
    cond: torch.Tensor | None = None  # [B, C] adaLN conditioning (DiT); None for models without one
    kv_cache: object | None = None  # after a pass that fills it (backbones with supports_kv_cache)


def unwrap(model: nn.Module) -> nn.Module:
    """The underlying transformers model of a peft wrapper (the model itself otherwise)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


class HFBackbone(nn.Module):
    """A Hugging Face MDM (optionally wrapped by peft) behind the backbone interface."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self._native = isinstance(unwrap(model), LLaDAModelLM)  # returns last_hidden_state, can skip logits

    @property
    def config(self):
        """The wrapped model's transformers config."""
        return unwrap(self.model).config

    @property
    def supports_kv_cache(self) -> bool:
        """Whether passes can fill and reuse a KV cache (prism-ds's LLaDA)."""
        return self._native

    def forward(self, tokens: torch.Tensor, need_logits: bool = True, attention_mask: torch.Tensor | None = None,
                logits_cols: torch.Tensor | None = None, **cache) -> BackboneOutput:
        """One pass; attention_mask [B, L] (1 = real token) for padded batches; logits only at logits_cols.

        cache (prism-ds's LLaDA): fill_cache=True, or kv_cache + fresh=(lo, hi) to compute [lo, hi) only.
        """
        if self._native:
            out = self.model(input_ids=tokens, attention_mask=attention_mask, return_logits=need_logits,
                             logits_cols=logits_cols, **cache)
            return BackboneOutput(logits=out.logits, last_hidden=out.last_hidden_state, kv_cache=out.kv_cache)
        if cache:
            raise ValueError(f"{type(unwrap(self.model)).__name__} has no KV cache support")
        out = self.model(input_ids=tokens, attention_mask=attention_mask, output_hidden_states=True)
        if getattr(out, "logits", None) is None or getattr(out, "hidden_states", None) is None:
            raise TypeError(f"{type(unwrap(self.model)).__name__} must return `logits` and `hidden_states` "
                            f"(output_hidden_states=True) to serve as a prism-ds backbone")
        logits = out.logits if logits_cols is None else out.logits[:, logits_cols]
        return BackboneOutput(logits=logits, last_hidden=out.hidden_states[-1])
