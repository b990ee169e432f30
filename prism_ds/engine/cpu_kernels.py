"""Which CPU kernels torch uses, so that a CPU run trains the same bits on every machine of one kind.

On x86-64, torch picks its vectorised ATen kernels (softmax, layer norm, reductions, optimizer arithmetic) and
MKL picks its matrix-multiply code path by the instructions the CPU has: AVX-512 on one Xeon, AVX2 on another,
AMD's paths on an EPYC. Each path rounds differently, so one seed trains a different model on each. Measured on
this project's 2-core CI kind (a 30-step Sudoku pretraining, weights hashed): capping oneDNN's ISA changed
nothing, while ATen's capability, MKL's code path and the thread count each changed the weights.

  cpu_kernels: native    torch's and MKL's own choice: fastest, reproducible only on the same CPU model
  cpu_kernels: portable  ATen's AVX2 kernels and MKL's conditional numerical reproducibility mode pinned to
                         AVX2 (MKL_CBWR=AVX2,STRICT, which MKL documents as the same results on every CPU with
                         AVX2 at the same thread count); about 1.5x slower training on an AVX-512 machine
                         (measured on CI's kind). Checked here by hiding AVX-512 from oneDNN, not on a second CPU.

Both are read by torch and MKL when they first compute, so they are set as environment variables before the
first tensor operation: `prism-ds` does it right after reading the recipe; a Python program calls
use_cpu_kernels() first (or exports the variables). The thread count is the other half: torch uses one thread
per core unless OMP_NUM_THREADS says otherwise, so compare runs at the same count.
"""
from __future__ import annotations

import os
import platform
import warnings

import torch

CPU_KERNELS = ("native", "portable")
PORTABLE_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2,STRICT"}


def check_cpu_kernels(mode: str) -> None:
    """Raise a ValueError naming the setting when `mode` is not one of CPU_KERNELS."""
    if mode not in CPU_KERNELS:
        raise ValueError(f"cpu_kernels={mode!r}: expected one of {CPU_KERNELS}")


def portable_active() -> bool:
    """Whether this process computes with the portable kernels (ATen at AVX2 and MKL pinned to AVX2)."""
    return (torch.backends.cpu.get_cpu_capability() == "AVX2"
            and all(os.environ.get(k) == v for k, v in PORTABLE_ENV.items()))


def use_cpu_kernels(mode: str) -> bool:
    """Select the CPU kernels for this process and its children (call before the first tensor operation);
    returns whether the choice took effect (native always does)."""
    check_cpu_kernels(mode)
    if mode == "native":
        return True
    if platform.machine().lower() not in ("x86_64", "amd64"):
        warnings.warn(f"cpu_kernels=portable pins x86-64 kernels; this {platform.machine()} machine runs its "
                      f"native ones", stacklevel=2)
        return False
    before = {k: os.environ.get(k) for k in PORTABLE_ENV}
    os.environ.update(PORTABLE_ENV)
    if portable_active():
        return True
    # torch fixed its kernels before we were asked (a tensor operation already ran): leave the environment as
    # it was, so child processes do not half-apply the choice, and say how to get it.
    for key, value in before.items():
        if value is None:
            os.environ.pop(key)
        else:
            os.environ[key] = value
    warnings.warn(f"cpu_kernels=portable: torch already chose its {torch.backends.cpu.get_cpu_capability()} "
                  "kernels in this process, so it runs native ones; the prism-ds command applies the setting, "
                  "or export " + " ".join(f"{k}={v}" for k, v in PORTABLE_ENV.items()) + " before starting "
                  "Python", stacklevel=2)
    return False


def describe_cpu() -> str:
    """One line naming the CPU, the kernels in use and the thread count, for results files."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            model = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), model)
    except OSError:
        pass
    kernels = "portable (ATen AVX2, MKL_CBWR=AVX2,STRICT)" if portable_active() else \
        f"native (ATen {torch.backends.cpu.get_cpu_capability()}, MKL's own path)"
    return f"{model}; {torch.get_num_threads()} threads; {kernels} kernels; torch {torch.__version__}"
