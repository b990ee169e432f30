"""GPU-only paths that CPU runs never take, checked on CPU (issue 20's device audit).

Each test stands in for the GPU with the least pretence it can: torch.cuda.is_available patched to True where
only the decision is checked, a checkpoint file whose storages say cuda:0, a CPU tensor that reports is_cuda
together with a stand-in flash_attn_func that has flash-attn's [B, L, H, D] contract.
"""
import json
import os
import stat
import subprocess
import sys
import types
import warnings
from pathlib import Path

import deepspeed  # imported while DS_ACCELERATOR=cpu (conftest), before any test pretends CUDA is there
import pytest
import torch
import torch.nn.functional as F

from prism_ds.config import RunConfig
from prism_ds.engine import distributed as dist_utils
from prism_ds.engine import monitor
from prism_ds.engine.resume import load_training_state, signature
from prism_ds.models import flash
from prism_ds.models.dit import DiTBlock
from prism_ds.models.llada import LLaDABlock, LLaDAConfig, rope_tables

REPO = Path(__file__).resolve().parents[1]


# ---- process group and device on a GPU host ------------------------------------------------------------------

@pytest.fixture
def gpu_host(monkeypatch):
    """A pretend 4-GPU host, rank 3 (local rank 3): records set_device and the backend init_distributed asks for."""
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(("set_device", torch.device(d))))
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(deepspeed, "init_distributed", lambda dist_backend: calls.append(("init", dist_backend)))
    for key, value in (("RANK", "3"), ("WORLD_SIZE", "4"), ("LOCAL_RANK", "3"), ("MASTER_ADDR", "127.0.0.1"),
                       ("MASTER_PORT", "29999")):
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    return calls


def test_a_gpu_rank_binds_its_own_gpu_before_the_nccl_group_exists(gpu_host):
    # NCCL barriers (before deepspeed.initialize: _start_over, the Sudoku data barrier, code-eval's merge) and
    # broadcast_object_list run on the current device: unbound, every rank of a node would use GPU 0.
    dist_utils.init_distributed()
    assert gpu_host == [("set_device", torch.device("cuda", 3)), ("init", "nccl")]
    assert dist_utils.device() == torch.device("cuda", 3)


def test_ds_accelerator_cpu_on_a_gpu_host_keeps_tensors_and_backend_on_the_cpu(gpu_host, monkeypatch):
    # The test suite and CPU launches set DS_ACCELERATOR=cpu: DeepSpeed's engine is then on the CPU, so batches,
    # generators and collectives must be too (cuda batches against a CPU engine, or NCCL on CPU tensors, fail).
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    dist_utils.init_distributed()
    assert gpu_host == [("init", "gloo")]
    assert dist_utils.device() == torch.device("cpu")


def test_mfu_uses_a_gpu_peak_only_for_gpu_ranks(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 80GB HBM3")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    assert monitor._peak_flops(0.0) is None  # CPU ranks on a GPU host: no H100 peak for a CPU run
    monkeypatch.delenv("DS_ACCELERATOR")
    assert monitor._peak_flops(0.0) == 989e12


# ---- resume: a rank state written by a GPU rank -----------------------------------------------------------------

def test_a_rank_state_written_on_a_gpu_resumes_on_the_cpu(tmp_path, monkeypatch):
    sig = signature(RunConfig(), "pretrain", 10, 1)
    tag_dir = tmp_path / "step00000002"
    tag_dir.mkdir()
    (tag_dir / "run.json").write_text(json.dumps({**sig, "step": 2}))
    shadow = {"w": torch.arange(6.0).view(2, 3)}
    with monkeypatch.context() as m:  # the storages are tagged cuda:0, as torch.save writes a GPU rank's EMA shadow
        m.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
        torch.save({"ema": {"shadow": shadow, "updates": 5}, "torch_rng": torch.get_rng_state()},
                   tag_dir / "rank0_state.pt")
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 0)
    engine = types.SimpleNamespace(load_checkpoint=lambda *a, **k: (str(tag_dir), {}))
    step, state = load_training_state(engine, tmp_path, "step00000002", sig, strict=True)
    assert step == 2 and state["ema"]["shadow"]["w"].device.type == "cpu"
    assert torch.equal(state["ema"]["shadow"]["w"], shadow["w"])


# ---- flash-attn: optional, imported once, the [B, L, H, D] layout ----------------------------------------------

class _LooksCuda(torch.Tensor):
    """A CPU tensor that reports is_cuda, so the GPU-only attention branch runs here."""

    @property
    def is_cuda(self):
        return True


def _fake_flash(calls):
    def flash_attn_func(q, k, v, causal=False):
        """flash-attn's contract: [B, L, H, D] (last dim contiguous), half precision, K/V heads may be fewer."""
        assert not causal and q.dtype in (torch.float16, torch.bfloat16) and q.stride(-1) == 1
        assert q.shape[0] == k.shape[0] and q.shape[2] % k.shape[2] == 0 and q.shape[3] == k.shape[3]
        calls.append(tuple(q.shape))
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        rep = q.shape[1] // k.shape[1]
        return F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1),
                                              v.repeat_interleave(rep, 1)).transpose(1, 2)
    return flash_attn_func


@pytest.fixture
def flash_module(monkeypatch):
    """Set sys.modules['flash_attn'] (None: not installed) with the import cache cleared before and after."""
    clear = getattr(flash.flash_attn_func, "cache_clear", lambda: None)
    clear()

    def use(module):
        monkeypatch.setitem(sys.modules, "flash_attn", module)
    yield use
    clear()


def _qkv(B=2, H=4, H_kv=4, L=5, D=8):
    torch.manual_seed(0)
    q, k, v = torch.randn(B, H, L, D), torch.randn(B, H_kv, L, D), torch.randn(B, H_kv, L, D)
    return [t.to(torch.bfloat16).as_subclass(_LooksCuda) for t in (q, k, v)]


def test_dit_flash_attention_without_flash_attn_falls_back_to_sdpa_with_one_warning(flash_module):
    flash_module(None)  # flash-attn not installed (the `gpu` extra is optional): was an ImportError mid-run
    block = DiTBlock(hidden=32, n_heads=4, cond_dim=8)
    block.use_flash = True
    q, k, v = _qkv()
    with pytest.warns(UserWarning, match="flash-attn cannot be imported"):
        out = block._attention(q, k, v)
    assert torch.equal(out, F.scaled_dot_product_attention(q, k, v))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # imported (and warned) once per process, not per block and pass
        block._attention(q, k, v)


def test_dit_flash_attention_gets_the_layout_flash_attn_expects(flash_module):
    calls = []
    flash_module(types.SimpleNamespace(flash_attn_func=_fake_flash(calls)))
    block = DiTBlock(hidden=32, n_heads=4, cond_dim=8)
    q, k, v = _qkv()
    reference = block._attention(q, k, v)  # use_flash off: SDPA
    block.use_flash = True
    out = block._attention(q, k, v)
    assert calls == [(2, 5, 4, 8)] and out.shape == reference.shape
    assert torch.allclose(out.float(), reference.float(), atol=1e-2)


@pytest.mark.parametrize("n_kv_heads", [4, 2])
def test_llada_flash_attention_matches_sdpa_full_and_cached_slice(flash_module, n_kv_heads):
    calls = []
    flash_module(types.SimpleNamespace(flash_attn_func=_fake_flash(calls)))
    torch.manual_seed(0)
    cfg = LLaDAConfig(d_model=32, n_heads=4, n_kv_heads=n_kv_heads, n_layers=1, mlp_hidden_size=48, vocab_size=50,
                      embedding_size=50, mask_token_id=49)
    block = LLaDABlock(cfg).to(torch.bfloat16)
    h = torch.randn(2, 6, 32).to(torch.bfloat16).as_subclass(_LooksCuda)
    rope = rope_tables(torch.arange(6), 8, cfg.rope_theta)
    with torch.no_grad():
        store = []
        full_sdpa = block.attention(h, rope, None, False, (None, None, 0, 6, store))
        full_flash = block.attention(h, rope, None, True)
        (k, v), = store
        # A cached pass: queries of positions [2, 4) only, keys and values of the whole canvas (lengths differ).
        rope_part, cache = tuple(t[2:4] for t in rope), (k, v, 2, 4, None)
        slice_flash = block.attention(h[:, 2:4], rope_part, None, True, cache)
        slice_sdpa = block.attention(h[:, 2:4], rope_part, None, False, cache)
    assert calls == [(2, 6, 4, 8), (2, 2, 4, 8)]
    assert torch.allclose(full_flash.float(), full_sdpa.float(), atol=2e-2)
    assert torch.allclose(slice_flash.float(), slice_sdpa.float(), atol=2e-2)


# ---- launchers/single_node.sh counts GPUs with the venv's torch --------------------------------------------------

def _exe(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def test_single_node_counts_gpus_with_the_projects_python(tmp_path):
    # A system python3 without torch (usual on GPU nodes: torch lives in .venv) counted 1 GPU: an 8-GPU node
    # trained on one of them. PYTHON stands in for .venv/bin/python on a 3-GPU node.
    log = tmp_path / "argv"
    fake_python = _exe(tmp_path / "python", "#!/usr/bin/env bash\necho 3\n")
    fake_ds = _exe(tmp_path / "deepspeed", f'#!/usr/bin/env bash\nprintf "%s\\n" "$@" > "{log}"\n')
    env = {k: v for k, v in os.environ.items() if k not in ("NPROC", "MASTER_PORT")}
    env.update(PYTHON=str(fake_python), DEEPSPEED=str(fake_ds))
    out = subprocess.run(["bash", str(REPO / "launchers" / "single_node.sh"), "--stage", "pretrain"], env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    argv = log.read_text().splitlines()
    assert argv == ["--num_gpus", "3", "--master_port", "29500", "--module", "prism_ds.cli", "train", "--no-progress",
                    "--stage", "pretrain"]
