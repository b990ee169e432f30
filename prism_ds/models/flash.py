"""flash-attn, imported once when `model.attention=flash` first reaches a GPU pass in bf16/fp16.

flash-attn is optional (the `gpu` extra). When it cannot be imported, attention runs with SDPA and one warning
says why, for the DiT and LLaDA alike: the import is tried once per process, not on every block of every pass.
"""
from __future__ import annotations

import functools
import warnings


@functools.cache
def flash_attn_func():
    """flash_attn.flash_attn_func ([B, L, H, D] layout), or None (warned once) when flash-attn cannot be imported."""
    try:
        from flash_attn import flash_attn_func as func
    except ImportError as exc:
        warnings.warn(f"model.attention=flash: flash-attn cannot be imported ({exc}); attention runs with SDPA "
                      f"instead (install it with pip install -e '.[gpu]')", stacklevel=3)
        return None
    return func
