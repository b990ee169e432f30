"""The GPU acceptance kit (eval/gpu/): the wheel check, prepare.sh, and every step of run.sh at tiny size on CPU."""
from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "eval" / "gpu"))
import check_wheels  # noqa: E402


def _wheel(folder: Path, filename: str, requires: list[str] = ()) -> Path:
    """A minimal wheel: just the METADATA pip and the checker read."""
    name, version = filename.split("-")[:2]
    path = folder / filename
    meta = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n" + "".join(f"Requires-Dist: {r}\n"
                                                                              for r in requires)
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{name}-{version}.dist-info/METADATA", meta)
    return path


def _carry_prism_needs(folder: Path) -> None:
    """Wheels for prism-ds's own needs the image lacks, so a test isolates the one problem it plants."""
    _wheel(folder, "deepspeed-0.19.8-py3-none-any.whl", ["torch>=2.0.0", "hjson"])
    _wheel(folder, "hjson-3.1.0-py3-none-any.whl")
    _wheel(folder, "datasets-5.2.0-py3-none-any.whl", ["dill<0.4.2", "pyarrow>=24.0.0"])
    _wheel(folder, "dill-0.4.1-py3-none-any.whl")


def test_check_wheels_accepts_a_complete_set(tmp_path):
    _carry_prism_needs(tmp_path)
    _wheel(tmp_path, "pydantic_core-2.50.5-cp312-cp312-manylinux_2_17_x86_64.whl")
    _wheel(tmp_path, "tree_sitter_python-0.25.0-cp310-abi3-manylinux_2_28_x86_64.whl")  # abi3 from 3.10 loads on 3.12
    _wheel(tmp_path, "evalplus-0.3.1-py3-none-any.whl", ["openai>=1.11.1; extra == 'x'", "anthropic>=0.34"])
    assert check_wheels.check(tmp_path, limit_mib=56) == []


@pytest.mark.parametrize("plant, expected", [
    (lambda d: _wheel(d, "pydantic_core-2.50.5-cp311-cp311-manylinux_2_17_x86_64.whl"), "does not install"),
    (lambda d: _wheel(d, "pydantic_core-2.50.5-cp312-cp312-macosx_11_0_arm64.whl"), "does not install"),
    (lambda d: _wheel(d, "dill-0.4.0-py3-none-any.whl"), "carried twice"),
    (lambda d: _wheel(d, "pydantic-2.14.4-py3-none-any.whl", ["pydantic-core==2.50.5"]), "neither carried"),
    (lambda d: _wheel(d, "stop_sequencer-1.2.3-py3-none-any.whl", ["transformers<5"]), "has transformers 5.17.0"),
])
def test_check_wheels_names_each_problem(tmp_path, plant, expected):
    _carry_prism_needs(tmp_path)
    plant(tmp_path)
    problems = check_wheels.check(tmp_path, limit_mib=56)
    assert len(problems) == 1 and expected in problems[0], problems


def test_check_wheels_size_limit_and_missing_prism_need(tmp_path):
    _carry_prism_needs(tmp_path)
    (tmp_path / "hjson-3.1.0-py3-none-any.whl").unlink()
    problems = check_wheels.check(tmp_path, limit_mib=0.0)
    assert any("needs hjson" in p for p in problems) and any("over the 0.0 MiB" in p for p in problems)


def test_prepare_builds_a_checked_wheel_set(tmp_path):
    """prepare.sh for real: DeepSpeed built without ops, the rest fetched for CPython 3.12, checked, MBPP copied."""
    out = subprocess.run(["bash", "eval/gpu/prepare.sh", str(tmp_path / "kit")], cwd=REPO, capture_output=True,
                         text=True, timeout=900)
    assert out.returncode == 0, out.stdout + out.stderr
    wheels = {p.name.split("-")[0].lower() for p in (tmp_path / "kit" / "wheels").glob("*.whl")}
    assert {"deepspeed", "datasets", "evalplus", "pydantic_core", "hjson"} <= wheels
    assert "0 problem(s)" in out.stdout
    assert (tmp_path / "kit" / "data" / "mbpp.jsonl").stat().st_size > 100_000


@pytest.mark.slow
def test_cpu_smoke_runs_every_step(tmp_path):
    """run.sh --cpu-smoke: each step ends ok and reports its figures (what a GPU session will read)."""
    # A process group's port in the environment (as an earlier in-process test leaves it) must not leak into the
    # kit's steps: it is set here on purpose, and bound, so a kit that passed it on would fail to rendezvous.
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(held.getsockname()[1]), "RANK": "0", "WORLD_SIZE": "1"}
        out = subprocess.run(["bash", "eval/gpu/run.sh", str(tmp_path / "out"), "--cpu-smoke"], cwd=REPO,
                             capture_output=True, text=True, timeout=1800, env=env)
    report = (tmp_path / "out" / "gpu_kit.md").read_text()
    log = (tmp_path / "out" / "gpu_kit.log").read_text()
    assert out.returncode == 0, report + log[-4000:]
    sections = re.split(r"\n## ", report)[1:]
    assert [s.split(".")[0] for s in sections] == ["0", "1", "2", "3", "4", "5"]
    assert all("\nok in " in s for s in sections), report
    env, llada, user, sampler, sudoku, owt = sections
    assert "| MATH | none | runs" in env
    assert len(re.findall(r"^\| [12] \| (on|off) \| [0-9.]+ \|", llada, re.M)) == 4  # mb 1, 2 x checkpointing
    assert "torch.bfloat16" in user and "finite: True" in user  # the bf16 export reloaded and ran
    assert re.search(r"\| prism \| .* \| 8 \| [0-9.]+% \| dual.jsonl \|", user), user  # both sample files scored
    assert "prism-ds dual cache" in sampler
    assert re.search(r"\| pretrain \| [0-9.]+ \|", sudoku) and re.search(r"\| finetune \| [0-9.]+ \|", sudoku)
    assert "| PRISM (k = 8, n_y = 4) |" in owt
