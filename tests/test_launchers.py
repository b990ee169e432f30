"""Hostfile validation and the multi-node / SLURM launch scripts, run against fake scontrol/srun/deepspeed."""
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from prism_ds.engine.hostfile import HostfileError, read_hostfile

REPO = Path(__file__).resolve().parents[1]
LAUNCHERS = REPO / "launchers"
# Settings the scripts read from the environment; a test run inside a real SLURM job must not leak them in.
_SCRIPT_ENV = ("HOSTFILE", "MASTER_ADDR", "MASTER_PORT", "DS_LAUNCH_ARGS", "DEEPSPEED", "PYTHON", "GPUS_PER_NODE",
               "PRISM_DS_ROOT")


def _write(path: Path, text: str, executable: bool = False) -> Path:
    path.write_text(text)
    if executable:
        path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


@pytest.fixture
def fakes(tmp_path):
    """(bin dir, log dir, env): fake scontrol/srun/deepspeed that record their argv, first on PATH."""
    bin_dir, log = tmp_path / "bin", tmp_path / "calls"
    bin_dir.mkdir()
    log.mkdir()
    _write(bin_dir / "scontrol", '#!/usr/bin/env bash\nprintf "%s\\n" "$@" > "$FAKE_LOG/scontrol"\n'
           '[ "$1 $2" = "show hostnames" ] || exit 1\ntr , "\\n" <<< "$3"\n', executable=True)
    # srun: drop its own options, then run the command once per simulated node, like --ntasks-per-node=1.
    _write(bin_dir / "srun", '#!/usr/bin/env bash\nprintf "%s\\n" "$@" > "$FAKE_LOG/srun"\n'
           'while [[ "${1:-}" == -* ]]; do shift; done\n'
           'for id in 0 1; do SLURM_NODEID=$id "$@" || exit; done\n', executable=True)
    _write(bin_dir / "deepspeed", '#!/usr/bin/env bash\nout="$FAKE_LOG/deepspeed.${SLURM_NODEID:-local}"\n'
           'printf "%s\\n" "$@" > "$out"\necho "$PWD" > "$out.pwd"\n', executable=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in _SCRIPT_ENV}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}", FAKE_LOG=str(log),
               DEEPSPEED=str(bin_dir / "deepspeed"), PYTHON=sys.executable)
    return bin_dir, log, env


def _argv(path: Path) -> list[str]:
    return path.read_text().splitlines()


@pytest.fixture
def checkout(tmp_path):
    """A stand-in repo root (prism_ds linked to the real package), so the SLURM script's runs/ lands in tmp."""
    root = tmp_path / "checkout"
    root.mkdir()
    (root / "prism_ds").symlink_to(REPO / "prism_ds", target_is_directory=True)
    return root


# ---- read_hostfile -------------------------------------------------------------------------------------------

def test_read_hostfile_accepts_the_example():
    assert read_hostfile(REPO / "hostfile.example") == {"node-01": 8, "node-02": 8}


def test_read_hostfile_skips_comments_and_blank_lines(tmp_path):
    hf = _write(tmp_path / "hosts", "# header\n\n   \nworker-a slots=4   # inline comment\n"
                                    "\tworker-b\tslots=2\n  # indented comment\nworker-c slots=1")
    assert list(read_hostfile(hf).items()) == [("worker-a", 4), ("worker-b", 2), ("worker-c", 1)]


@pytest.mark.parametrize("bad_line, fragment", [
    ("worker-b", "expected '<host> slots=<n>'"),
    ("worker-b slot=4", "expected '<host> slots=<n>'"),
    ("worker-b slots=4 extra", "expected '<host> slots=<n>'"),
    ("slots=4", "expected '<host> slots=<n>'"),
    ("worker-b slots=", "positive integer"),
    ("worker-b slots=four", "positive integer"),
    ("worker-b slots=2.5", "positive integer"),
    ("worker-b slots=0", "positive integer"),
    ("worker-b slots=-1", "positive integer"),
    ("worker-a slots=2", "duplicate host 'worker-a' (first on line 2)"),
])
def test_read_hostfile_names_file_line_and_text(tmp_path, bad_line, fragment):
    hf = _write(tmp_path / "my_hosts", f"# cluster\nworker-a slots=4\n\n{bad_line}\nworker-z slots=1\n")
    with pytest.raises(ValueError) as exc:
        read_hostfile(hf)
    message = str(exc.value)
    assert f"{hf}:4:" in message and fragment in message and repr(bad_line) in message


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n  # another\n"])
def test_read_hostfile_rejects_a_file_without_hosts(tmp_path, text):
    hf = _write(tmp_path / "empty_hosts", text)
    with pytest.raises(HostfileError, match="no hosts") as exc:
        read_hostfile(hf)
    assert str(hf) in str(exc.value)


def test_read_hostfile_rejects_a_missing_file(tmp_path):
    with pytest.raises(ValueError, match="cannot read hostfile"):
        read_hostfile(tmp_path / "nope")


# ---- python -m prism_ds.engine.hostfile ----------------------------------------------------------------------

@pytest.mark.parametrize("entry", [["-m", "prism_ds.engine.hostfile"], [str(REPO / "prism_ds/engine/hostfile.py")]])
def test_check_command_exit_codes(tmp_path, entry):
    good = _write(tmp_path / "good", "# two nodes\nn1 slots=8\nn2 slots=8\n")
    out = subprocess.run([sys.executable, *entry, "check", str(good)], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert "n1 slots=8" in out.stdout and "n2 slots=8" in out.stdout and "16 slots" in out.stdout
    bad = _write(tmp_path / "bad", "n1 slots=8\n\nn2 slots=eight\n")
    out = subprocess.run([sys.executable, *entry, "check", str(bad)], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 2 and out.stdout == ""
    assert f"{bad}:3:" in out.stderr and "n2 slots=eight" in out.stderr
    out = subprocess.run([sys.executable, *entry, "check", str(good), "--first"], capture_output=True, text=True,
                         cwd=REPO)
    assert out.returncode == 0 and out.stdout == "n1\n"
    out = subprocess.run([sys.executable, *entry, "check", str(bad), "--first"], capture_output=True, text=True,
                         cwd=REPO)
    assert out.returncode == 2 and out.stdout == "" and f"{bad}:3:" in out.stderr


# ---- launch scripts ------------------------------------------------------------------------------------------

def test_every_launcher_parses():
    scripts = sorted(p for p in LAUNCHERS.iterdir() if p.suffix in (".sh", ".sbatch"))
    assert {"single_node.sh", "multi_node.sh", "slurm.sbatch", "setup.sh"} <= {p.name for p in scripts}
    for script in scripts:
        out = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert out.returncode == 0, f"{script.name}: {out.stderr}"


FORWARDED = ["--stage", "finetune", "--recipe", "sudoku_cpu", "run_dir=a b", "finetune.steps=3", "x='q' \"y\" $HOME"]



@pytest.mark.parametrize("gpu_env, slots", [({"SLURM_GPUS_ON_NODE": "2"}, 2),
                                            ({"SLURM_GPUS_PER_NODE": "h100:2"}, 2),
                                            ({}, 8)])
def test_slurm_script_launches_one_deepspeed_per_node(fakes, checkout, tmp_path, gpu_env, slots):
    _, log, env = fakes
    env.update(gpu_env, SLURM_JOB_NODELIST="nodeA,nodeB", SLURM_JOB_ID="4242", SLURM_SUBMIT_DIR=str(tmp_path),
               PRISM_DS_ROOT=str(checkout))
    out = subprocess.run(["bash", str(LAUNCHERS / "slurm.sbatch"), *FORWARDED], capture_output=True, text=True,
                         env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    hostfile = checkout / "runs" / "hostfile.4242"
    assert hostfile.read_text() == f"nodeA slots={slots}\nnodeB slots={slots}\n"
    assert _argv(log / "scontrol") == ["show", "hostnames", "nodeA,nodeB"]
    assert "--ntasks-per-node=1" in _argv(log / "srun")
    for rank in (0, 1):
        argv = _argv(log / f"deepspeed.{rank}")
        assert argv == [
            "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(rank), "--master_addr", "nodeA",
            "--master_port", "29742", "--module", "prism_ds.cli", "train", "--no-progress", *FORWARDED]
        assert "run_dir=a b" in argv and "a" not in argv  # one argument, not split on the space
        assert (log / f"deepspeed.{rank}.pwd").read_text().strip() == str(checkout)


def test_slurm_script_uses_submit_dir_and_extra_launcher_args(fakes, checkout, tmp_path):
    _, log, env = fakes
    env.update(SLURM_JOB_NODELIST="gpu1,gpu2", SLURM_JOB_ID="7", SLURM_GPUS_ON_NODE="4",
               SLURM_SUBMIT_DIR=str(checkout), MASTER_PORT="31000", DS_LAUNCH_ARGS="--bind_cores_to_rank --quiet")
    out = subprocess.run(["bash", str(LAUNCHERS / "slurm.sbatch"), "--stage", "pretrain"], capture_output=True,
                         text=True, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    hostfile = checkout / "runs" / "hostfile.7"
    assert hostfile.read_text() == "gpu1 slots=4\ngpu2 slots=4\n"
    argv = _argv(log / "deepspeed.1")
    assert argv[:11] == ["--hostfile", str(hostfile), "--no_ssh", "--node_rank", "1", "--master_addr",
                         "gpu1", "--master_port", "31000", "--bind_cores_to_rank", "--quiet"]
    assert argv[11:] == ["--module", "prism_ds.cli", "train", "--no-progress", "--stage", "pretrain"]


def test_slurm_script_refuses_a_directory_that_is_not_the_repo(fakes, tmp_path):
    _, log, env = fakes
    env.update(SLURM_JOB_NODELIST="nodeA", SLURM_JOB_ID="1", SLURM_SUBMIT_DIR=str(tmp_path))
    out = subprocess.run(["bash", str(LAUNCHERS / "slurm.sbatch"), "--stage", "pretrain"], capture_output=True,
                         text=True, env=env, cwd=tmp_path)
    assert out.returncode == 2 and "PRISM_DS_ROOT" in out.stderr
    assert not list(log.iterdir())


def test_multi_node_defaults_master_to_first_host(fakes, tmp_path):
    _, log, env = fakes
    _write(tmp_path / "hostfile", "# cluster\n\nhost-b slots=2\nhost-a slots=2\n")
    out = subprocess.run(["bash", str(LAUNCHERS / "multi_node.sh"), *FORWARDED], capture_output=True, text=True,
                         env=env, cwd=tmp_path)  # HOSTFILE defaults to ./hostfile of the caller's directory
    assert out.returncode == 0, out.stdout + out.stderr
    assert _argv(log / "deepspeed.local") == [
        "--hostfile", str(tmp_path / "hostfile"), "--master_addr", "host-b", "--master_port", "29500",
        "--module", "prism_ds.cli", "train", "--no-progress", *FORWARDED]
    assert (log / "deepspeed.local.pwd").read_text().strip() == str(REPO)


def test_multi_node_passes_env_overrides(fakes, tmp_path):
    _, log, env = fakes
    hf = _write(tmp_path / "cluster.txt", "host-a slots=1\nhost-b slots=1\n")
    env.update(HOSTFILE=str(hf), MASTER_ADDR="10.0.0.1", MASTER_PORT="30001", DS_LAUNCH_ARGS="--no_ssh --node_rank 1")
    out = subprocess.run(["bash", str(LAUNCHERS / "multi_node.sh"), "--stage", "pretrain"], capture_output=True,
                         text=True, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert _argv(log / "deepspeed.local") == [
        "--hostfile", str(hf), "--master_addr", "10.0.0.1", "--master_port", "30001", "--no_ssh", "--node_rank", "1",
        "--module", "prism_ds.cli", "train", "--no-progress", "--stage", "pretrain"]


@pytest.mark.parametrize("text, where", [("host-a slots=2\nhost-b\n", "bad_hosts:2:"),
                                         ("host-a slots=2\nhost-a slots=2\n", "bad_hosts:2:"),
                                         ("# nothing\n", "bad_hosts: hostfile has no hosts")])
@pytest.mark.parametrize("master", [None, "10.0.0.1"])  # an explicit MASTER_ADDR must not skip the check
def test_multi_node_stops_on_a_bad_hostfile(fakes, tmp_path, text, where, master):
    _, log, env = fakes
    env["HOSTFILE"] = str(_write(tmp_path / "bad_hosts", text))
    if master:
        env["MASTER_ADDR"] = master
    out = subprocess.run(["bash", str(LAUNCHERS / "multi_node.sh"), "--stage", "pretrain"], capture_output=True,
                         text=True, env=env, cwd=tmp_path)
    assert out.returncode == 2 and where in out.stderr
    assert not (log / "deepspeed.local").exists()


def test_multi_node_stops_on_a_missing_hostfile(fakes, tmp_path):
    _, log, env = fakes
    out = subprocess.run(["bash", str(LAUNCHERS / "multi_node.sh"), "--stage", "pretrain"], capture_output=True,
                         text=True, env=env, cwd=tmp_path)
    assert out.returncode == 2 and "cannot read hostfile" in out.stderr
    assert not (log / "deepspeed.local").exists()
