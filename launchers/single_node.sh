#!/usr/bin/env bash
# Train one stage on all GPUs of this node (or N CPU ranks with DS_ACCELERATOR=cpu):
#   NPROC=2 launchers/single_node.sh --stage finetune --recipe sudoku_9x9_gpu finetune.ds_config=zero3.json
# Env: NPROC (default: this node's GPU count, else 1), MASTER_PORT (29500), DEEPSPEED (.venv/bin/deepspeed),
# PYTHON (.venv/bin/python).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
# The GPUs are counted by the venv's torch: a system python3 without torch (or a CPU build) counted 1, so an
# 8-GPU node trained on one GPU.
NPROC="${NPROC:-$("$PY" -c 'import torch; print(max(torch.cuda.device_count(), 1))' 2>/dev/null || echo 1)}"
exec "${DEEPSPEED:-.venv/bin/deepspeed}" --num_gpus "$NPROC" --master_port "${MASTER_PORT:-29500}" \
    --module prism_ds.cli train --no-progress "$@"
