"""The GPU kit's first section: the machine and the software the figures came from, and which SDPA backends run.

    python eval/gpu/env_report.py        (prints Markdown)

SDPA backends are tried one at a time (torch.nn.attention.sdpa_kernel) on bf16 tensors of LLaDA-8B's attention
shape (32 heads of dimension 128; 1024 positions on a GPU, 128 on CPU), once without a mask and once with a boolean
padding mask, as prism-ds calls them (models/llada.py); a backend that refuses the inputs says why.
"""
from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
import time
import warnings

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.functional import scaled_dot_product_attention

PACKAGES = ("torch", "deepspeed", "transformers", "peft", "datasets", "safetensors", "tokenizers", "evalplus",
            "flash-attn", "numpy", "pyarrow")


def _version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _gpu_line() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip() or out.stderr.strip()
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"nvidia-smi unavailable ({e.__class__.__name__})"


def sdpa_backends(device: torch.device, length: int) -> list[str]:
    """One Markdown row per (backend, mask): runs or the reason it does not, and the time of one call."""
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(1, 32, length, 128, device=device, dtype=torch.bfloat16, generator=g) for _ in range(3))
    pad = torch.ones(1, 1, length, length, dtype=torch.bool, device=device)
    pad[..., -length // 8:] = False  # the last eighth is padding, as in a left/right-padded batch
    rows = []
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION,
                    SDPBackend.MATH):
        for mask_name, mask in (("none", None), ("bool padding", pad)):
            try:
                with sdpa_kernel([backend]), warnings.catch_warnings(record=True) as why:
                    warnings.simplefilter("always")  # torch gives a refusing backend's reason as a warning
                    scaled_dot_product_attention(q, k, v, attn_mask=mask)  # warm-up (kernel selection, JIT)
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    scaled_dot_product_attention(q, k, v, attn_mask=mask)
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                result = f"runs, {1e3 * (time.perf_counter() - t0):.2f} ms"
            except RuntimeError as e:
                reasons = [str(w.message).strip().splitlines()[0] for w in why] or [str(e).strip().splitlines()[0]]
                result = "refused: " + "; ".join(reasons)[:200].replace("|", "/")
            rows.append(f"| {backend.name} | {mask_name} | {result} |")
    return rows


def main() -> None:
    """Print the environment section of the kit's report."""
    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda" if on_gpu else "cpu")
    print(f"- device: {torch.cuda.get_device_name() if on_gpu else 'CPU only'}"
          + (f" ({torch.cuda.get_device_properties(0).multi_processor_count} SMs); nvidia-smi: {_gpu_line()}"
             if on_gpu else f" ({os.cpu_count()} cores, {platform.processor() or platform.machine()})"))
    print(f"- Python {platform.python_version()}; torch CUDA {torch.version.cuda}, cuDNN "
          f"{torch.backends.cudnn.version() if on_gpu else '-'}; DS_ACCELERATOR={os.environ.get('DS_ACCELERATOR', '')}")
    print("- packages: " + ", ".join(f"{name} {_version(name)}" for name in PACKAGES))
    length = 1024 if on_gpu else 128
    print(f"\nSDPA backends, bf16, 32 heads x dim 128, {length} positions ({device.type}):\n")
    print("| backend | mask | result |\n|---|---|---|")
    print("\n".join(sdpa_backends(device, length)))


if __name__ == "__main__":
    main()
