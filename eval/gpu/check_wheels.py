"""Check the GPU kit's wheel folder: every wheel installs on CPython 3.12 manylinux x86_64, no package twice, every
requirement of a carried wheel (and of prism-ds itself) met by another carried wheel or by the GPU image, and the
folder fits what the device tool carries.

    .venv/bin/python eval/gpu/check_wheels.py .gpu/wheels [--limit-mib 56]

Exit status 1 with one line per problem, naming the wheel and the requirement.
"""
from __future__ import annotations

import argparse
import sys
import tomllib
import zipfile
from email.parser import Parser
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import Version

REPO = Path(__file__).resolve().parents[2]
# The GPU image's Python packages (the device tool's KINDS.md, read 2026-11-17), with the versions a session's pip
# list showed there; None where no version was read (any version is taken to satisfy a requirement).
IMAGE: dict[str, str | None] = {
    "torch": "2.11.0", "transformers": "5.17.0", "numpy": "2.5.2", "huggingface-hub": "1.33.0",
    "safetensors": "0.8.0", "sentencepiece": "0.2.2", "tokenizers": "0.23.2", "accelerate": "1.15.0",
    "triton": "3.6.0", **{name: None for name in (
        "peft", "tensorboard", "matplotlib", "tqdm", "pyyaml", "pandas", "pyarrow", "psutil", "ninja", "msgpack",
        "einops", "py-cpuinfo", "rich", "multipledispatch", "xxhash", "filelock", "packaging", "requests",
        "aiohttp", "httpx", "jinja2", "regex", "setuptools", "pillow", "protobuf", "nvidia-ml-py", "six",
        "markdown-it-py", "pygments", "certifi", "urllib3", "idna", "charset-normalizer", "fsspec", "scipy",
        "scikit-learn", "typing-extensions", "attrs", "sympy", "networkx")}}
# evalplus declares its code-generation clients as requirements; prism-ds uses only its data and execution, which
# never import them (launchers/setup.sh installs evalplus with --no-deps for the same reason).
NEVER_IMPORTED = {"openai", "anthropic", "google-generativeai"}
PYTHON = "3.12"
MARKERS = {"python_version": PYTHON, "python_full_version": f"{PYTHON}.3", "sys_platform": "linux",
           "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
           "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": ""}


def installs_on_gpu_python(filename: str) -> bool:
    """True when a wheel's tags accept CPython 3.12 on manylinux x86_64."""
    _, _, _, tags = parse_wheel_filename(filename)
    def python_ok(t) -> bool:  # abi3 wheels built for CPython 3.N load on every later CPython
        if t.abi == "abi3":
            return t.interpreter.startswith("cp3") and int(t.interpreter[3:]) <= 12
        return t.interpreter in ("py3", "cp312", "py312") and t.abi in ("none", "cp312")

    return any(python_ok(t) and (t.platform == "any" or (t.platform.startswith("manylinux")
                                                         and t.platform.endswith("x86_64"))) for t in tags)


def wheel_requirements(path: Path) -> list[Requirement]:
    """Requires-Dist of a wheel that apply on the GPU machine (extras and other platforms left out)."""
    with zipfile.ZipFile(path) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        lines = Parser().parsestr(z.read(meta).decode()).get_all("Requires-Dist") or []
    reqs = [Requirement(line) for line in lines]
    return [r for r in reqs if r.marker is None or r.marker.evaluate(MARKERS)]


def check(folder: Path, limit_mib: float) -> list[str]:
    """Every problem with the wheel folder, as lines naming the wheel and what is wrong."""
    problems, carried = [], {}
    wheels = sorted(folder.glob("*.whl"))
    if not wheels:
        return [f"{folder}: no wheels (run eval/gpu/prepare.sh)"]
    for w in wheels:
        name, version, _, _ = parse_wheel_filename(w.name)
        if not installs_on_gpu_python(w.name):
            problems.append(f"{w.name}: does not install on CPython {PYTHON} manylinux x86_64")
        if name in carried:
            problems.append(f"{w.name}: {name} is carried twice ({carried[name][1].name}); pip refuses both")
        carried[name] = (version, w)
    available = {canonicalize_name(n): (Version(v) if v else None) for n, v in IMAGE.items()}
    available |= {n: v for n, (v, _) in carried.items()}  # a carried wheel replaces the image's copy
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    needs = [("prism-ds (pyproject.toml)", Requirement(r)) for r in project["dependencies"]]
    needs += [(w.name, r) for _, w in carried.values() for r in wheel_requirements(w)]
    for who, req in needs:
        name = canonicalize_name(req.name)
        if name in NEVER_IMPORTED:
            continue
        if name not in available:
            problems.append(f"{who}: needs {req}, neither carried nor in the GPU image")
        elif available[name] is not None and not req.specifier.contains(available[name], prereleases=True):
            problems.append(f"{who}: needs {req}, has {name} {available[name]}")
    size = sum(w.stat().st_size for w in wheels) / 2**20
    if size > limit_mib:
        problems.append(f"{folder}: {size:.1f} MiB of wheels, over the {limit_mib} MiB the kit may carry")
    print(f"[check_wheels] {len(wheels)} wheels, {size:.1f} MiB, {len(needs)} requirements checked, "
          f"{len(problems)} problem(s)")
    return problems


def main() -> int:
    """Check the folder given on the command line; print problems; exit 1 if any."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("folder", type=Path)
    p.add_argument("--limit-mib", type=float, default=56.0)
    args = p.parse_args()
    problems = check(args.folder, args.limit_mib)
    for line in problems:
        print(f"  {line}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
