"""Where this process computes: the one rule every layer (model loading, the engine, samplers) shares."""
from __future__ import annotations

import os

import torch


def uses_cuda() -> bool:
    """Whether this process computes on its GPU: CUDA is there and DeepSpeed's accelerator is CUDA. A GPU host
    with DS_ACCELERATOR=cpu (the test suite, CPU launches) runs on CPU ranks under gloo, so the device, the
    backend, the engine and the default dtype must all say CPU there."""
    return torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "cuda") == "cuda"
