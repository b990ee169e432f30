#!/usr/bin/env bash
# The flagship path on CPU in about a minute: write a tiny random LLaDA folder (official layout, special
# tokens and chat template) and code pairs, PRISM fine-tune it with LoRA + the projection+linear head on
# 2 CPU ranks under ZeRO-3, then reload the export (base + adapter + head) without DeepSpeed.
#   bash launchers/llada_tiny.sh [extra overrides, e.g. finetune.steps=20]
set -euo pipefail
cd "$(dirname "$0")/.."
export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"
[ -f runs/llada-tiny/model/config.json ] || .venv/bin/prism-ds make-tiny-llada --out runs/llada-tiny
NPROC="${NPROC:-2}" launchers/single_node.sh --stage finetune --recipe llada_tiny "$@"
# Reload the export (base + adapter + head, and the adapter merged) and run a batch: eval/gpu/check_export.py, the
# same check the GPU kit runs.
.venv/bin/python eval/gpu/check_export.py runs/llada-tiny/finetune/final
