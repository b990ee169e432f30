#!/usr/bin/env bash
# Train one stage on all GPUs of this node (or N CPU ranks with DS_ACCELERATOR=cpu):
#   NPROC=2 launchers/single_node.sh --stage finetune --recipe sudoku_9x9_gpu finetune.ds_config=zero3.json
set -euo pipefail
cd "$(dirname "$0")/.."
NPROC="${NPROC:-$(python3 -c 'import torch; print(max(torch.cuda.device_count(), 1))' 2>/dev/null || echo 1)}"
exec .venv/bin/deepspeed --num_gpus "$NPROC" --master_port "${MASTER_PORT:-29500}" \
    --module prism_ds.cli train --no-progress "$@"
