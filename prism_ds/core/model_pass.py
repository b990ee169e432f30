"""The sampler's model pass: one batched forward per step, giving the logits at the window's columns and, when the
step may remask with a quality score, the quality of the current tokens.

It tells the model only what it needs (scripted and plain models take no attention mask, column list or cache
arguments), runs classifier-free guidance as a second half of the same batch, and asks the KV cache
(core/kv_cache.py) what the pass recomputes.
"""
from __future__ import annotations

import torch

from prism_ds.core.kv_cache import PassCache
from prism_ds.core.schedules import StepPlan


class ModelPass:
    """Calls the model for the sampler: padding, guidance, cache; records (rows, positions computed) per pass."""

    def __init__(self, model, mask_id: int, cfg_scale: float, attention_mask: torch.Tensor | None,
                 cfg_mask: torch.Tensor | None, cache: PassCache | None, passes: list | None):
        if cfg_scale > 0 and cfg_mask is None:
            raise ValueError("sampler.cfg_scale > 0 needs the positions to mask for the unconditional pass (cfg_mask)")
        self.model, self.mask_id, self.cfg_scale = model, mask_id, cfg_scale
        self.attention_mask, self.cfg_mask, self.cache, self.passes = attention_mask, cfg_mask, cache, passes

    def __call__(self, tokens: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, plan: StepPlan,
                 need_quality: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(logits at `cols` [R, W, V], quality [R, L] or None) for the rows' tokens [R, L]."""
        length = tokens.shape[1]
        windows = plan.window_id if plan.window_id is not None else 0  # schedules without windows: one window
        windows = torch.as_tensor(windows, device=tokens.device).expand(len(rows))
        cache_args, computed = ({}, (0, length)) if self.cache is None else \
            self.cache.arguments(rows, windows, cols, length)
        pick = lambda t: None if t is None else t[rows]  # noqa: E731
        out = self._forward(tokens, need_quality, pick(self.attention_mask), pick(self.cfg_mask),
                            None if len(cols) == length else cols, cache_args)
        if self.cache is not None and "fill_cache" in cache_args:
            self.cache.keep(out.kv_cache, rows, windows)
        if self.passes is not None:
            self.passes.append((len(rows), computed))
        quality = out.quality
        if quality is not None and quality.shape[1] != length:  # a cached pass scores the positions it computed
            quality = torch.zeros(tokens.shape, dtype=quality.dtype, device=tokens.device).index_copy(
                1, torch.arange(*computed, device=tokens.device), quality)
        return out.logits, quality

    def _forward(self, tokens, need_quality: bool, attention_mask, cfg_mask, cols, cache_args: dict):
        """Logits at `cols` (all positions when None; guided when cfg_scale > 0) and quality, in one batched pass."""
        def kw(am):  # only what the model must be told
            return {**({} if am is None else {"attention_mask": am}), **({} if cols is None else {"logits_cols": cols}),
                    **cache_args}

        if self.cfg_scale <= 0:
            return self.model(tokens, need_logits=True, need_quality=need_quality, **kw(attention_mask))
        uncond = tokens.masked_fill(cfg_mask, self.mask_id)
        am = None if attention_mask is None else torch.cat([attention_mask, attention_mask])
        out = self.model(torch.cat([tokens, uncond]), need_logits=True, need_quality=need_quality, **kw(am))
        cond, un = out.logits.chunk(2)
        out.logits = un + (self.cfg_scale + 1) * (cond - un)
        out.quality = None if out.quality is None else out.quality[: len(tokens)]  # quality of the real state
        return out
