"""cpu_kernels=portable: the same bits whatever the CPU offers beyond AVX2, applied by the prism-ds command."""
from __future__ import annotations

import os
import platform
import subprocess
import sys
import warnings

import pytest
import torch

from prism_ds.engine.cpu_kernels import PORTABLE_ENV, describe_cpu, use_cpu_kernels
from helpers import subprocess_env

x86 = pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="x86-64 kernels")

# Runs in a fresh interpreter: prism-ds is imported first (as the CLI does), then the kernels are chosen, then
# matmul (MKL), softmax and layer norm (ATen's vectorised kernels) are hashed.
_PROBE = """
import hashlib, sys, prism_ds, torch
from prism_ds.engine.cpu_kernels import use_cpu_kernels
use_cpu_kernels(sys.argv[1])
g = torch.Generator().manual_seed(0)
a, b = torch.randn(257, 300, generator=g), torch.randn(300, 129, generator=g)
norm = torch.nn.functional.layer_norm(a, (300,)).exp()
out = torch.cat([(a @ b).flatten(), torch.softmax(a * 3, -1).flatten(), norm.flatten()])
print(hashlib.sha256(out.numpy().tobytes()).hexdigest(), torch.backends.cpu.get_cpu_capability())
"""


def _probe(mode: str, **env) -> tuple[str, str]:
    base = {k: v for k, v in subprocess_env().items() if k not in PORTABLE_ENV and k != "MKL_ENABLE_INSTRUCTIONS"}
    base["OMP_NUM_THREADS"] = "2"
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], env={**base, **env}, capture_output=True, text=True,
                         timeout=120, check=True).stdout.split()
    return out[0], out[1]


@x86
def test_portable_kernels_give_the_same_bits_when_the_cpu_offers_less():
    portable, capability = _probe("portable")
    assert capability == "AVX2"
    # The same process with the variables exported before Python started: the CLI's late choice took effect.
    assert _probe("native", **PORTABLE_ENV)[0] == portable
    # A CPU without AVX-512, simulated: MKL limited to AVX2 code paths, ATen to its AVX2 kernels.
    assert _probe("portable", MKL_ENABLE_INSTRUCTIONS="AVX2")[0] == portable
    native, native_capability = _probe("native")
    if native_capability != "AVX2":  # on an AVX-512 machine the native kernels round differently
        assert native != portable


def test_portable_choice_after_torch_computed_warns_and_leaves_the_environment_alone(monkeypatch):
    for key in PORTABLE_ENV:
        monkeypatch.delenv(key, raising=False)
    torch.ones(3).softmax(0)  # this process has computed: torch's kernels are fixed
    if torch.backends.cpu.get_cpu_capability() == "AVX2" or platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip("needs an x86-64 CPU beyond AVX2 (there portable and native kernels coincide)")
    with pytest.warns(UserWarning, match="already chose its"):
        assert use_cpu_kernels("portable") is False
    assert not any(key in os.environ for key in PORTABLE_ENV)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert use_cpu_kernels("native") is True


def test_unknown_kernels_are_a_named_error(tmp_path, capsys):
    from prism_ds.cli import main

    with pytest.raises(ValueError, match="cpu_kernels='fast'"):
        use_cpu_kernels("fast")
    assert main(["train", "--stage", "pretrain", f"run_dir={tmp_path}", "cpu_kernels=fast"]) == 2
    assert "cpu_kernels='fast'" in capsys.readouterr().err
    assert "threads" in describe_cpu() and "kernels" in describe_cpu()
