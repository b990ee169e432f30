#!/usr/bin/env bash
# Create .venv and install prism-ds. torch==2.13.0 goes first so a CPU machine gets the CPU wheel
# (and DeepSpeed builds against it); `--test` adds the test tools.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null 2>&1 || PY=python3
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q torch==2.13.0
extras=""
[ "${1:-}" = "--test" ] && extras="[test]"
.venv/bin/python -m pip install -q -e ".${extras}"
echo "prism-ds installed in .venv ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
