"""The sampler's KV cache (Fast-dLLM style, for backbones that support one, e.g. prism-ds's LLaDA): what each pass
recomputes, and the keys/values it reads for the rest.

  none    every pass computes every position
  prefix  a row's first pass in a window (block) is a full pass that caches every position's keys/values; its
          later passes recompute the window and everything after it and read the prefix (prompt, finished
          blocks) from the cache
  dual    the later passes recompute the window only; the suffix is read from the cache too
Rows only ever leave a batch, so a pass reads the cached rows it still has. When the rows of a pass are in
different windows (threshold decoding paces rows apart), a cached pass recomputes the span covering all their
windows, and a row entering a new window makes the pass a full one that refills every row's cache.
"""
from __future__ import annotations

import warnings

import torch

CACHE_MODES = ("none", "prefix", "dual")


class PassCache:
    """The KV state of the last full pass, the rows it holds and the window each row was in then."""

    def __init__(self, mode: str, n_rows: int, device: torch.device):
        self.mode, self.kv, self.kv_rows = mode, None, None
        self.window = torch.full((n_rows,), -1, dtype=torch.long, device=device)

    @classmethod
    def for_model(cls, mode: str, model, cfg_scale: float, n_rows: int, device: torch.device) -> PassCache | None:
        """The cache for `mode` (one of CACHE_MODES, checked with the other fast-sampling settings), or None (full
        passes) for mode none or a model without KV-cache support (warned)."""
        if mode == "none":
            return None
        if cfg_scale > 0:
            raise ValueError("sampler.cache with sampler.cfg_scale > 0 is not supported (use cache=none)")
        if not getattr(model, "supports_kv_cache", False):
            warnings.warn(f"sampler.cache={mode!r}: this model has no KV cache support (or its quality head attends "
                          f"across positions); sampling without a cache", stacklevel=3)
            return None
        return cls(mode, n_rows, device)

    def arguments(self, rows: torch.Tensor, windows: torch.Tensor, cols: torch.Tensor,
                  length: int) -> tuple[dict, tuple[int, int]]:
        """(the model's cache keyword arguments, positions [lo, hi) the pass computes) for a pass over `rows`, in
        `windows` [R], whose logits are wanted at `cols`."""
        if len(cols) == length:
            return {}, (0, length)
        if self.kv is None or bool((self.window[rows] != windows).any()):  # a new window: refill
            return {"fill_cache": True}, (0, length)
        lo, hi = int(cols[0]), int(cols[-1]) + 1
        fresh = (lo, length) if self.mode == "prefix" else (lo, hi)
        return {"kv_cache": self.kv.rows(torch.searchsorted(self.kv_rows, rows)), "fresh": fresh}, fresh

    def keep(self, kv, rows: torch.Tensor, windows: torch.Tensor) -> None:
        """Store a full pass's keys/values (kv is None after other passes: nothing to store)."""
        if kv is not None:
            self.kv, self.kv_rows = kv, rows
            self.window[rows] = windows
