#!/usr/bin/env bash
# Train one stage on every node of a DeepSpeed hostfile (format: hostfile.example):
#   HOSTFILE=hostfile launchers/multi_node.sh --stage finetune --recipe sudoku_9x9_gpu finetune.ds_config=zero3.json
# Run it on the first host. DeepSpeed's default runner starts the other nodes with pdsh over passwordless
# ssh, and every node needs the same checkout (and .venv) at the same path. Without ssh/pdsh, run it on each
# node with that node's index in the hostfile:
#   DS_LAUNCH_ARGS="--no_ssh --node_rank 0" launchers/multi_node.sh --stage finetune ...   # on the 1st host
#   DS_LAUNCH_ARGS="--no_ssh --node_rank 1" launchers/multi_node.sh --stage finetune ...   # on the 2nd host
# Env: HOSTFILE (./hostfile, relative to the current directory), MASTER_ADDR (first host in HOSTFILE; set it
# when --include/--exclude drop that host), MASTER_PORT (29500), DS_LAUNCH_ARGS (extra deepspeed launcher
# flags, split on whitespace), DEEPSPEED (.venv/bin/deepspeed), PYTHON (.venv/bin/python).
set -euo pipefail
HOSTFILE="${HOSTFILE:-./hostfile}"
[[ "$HOSTFILE" = /* ]] || HOSTFILE="$PWD/${HOSTFILE#./}"
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
# Strict check first (deepspeed itself falls back to local GPUs on a missing file); exits 2 naming file:line.
"$PY" prism_ds/engine/hostfile.py check "$HOSTFILE" >&2
MASTER_ADDR="${MASTER_ADDR:-$("$PY" prism_ds/engine/hostfile.py check "$HOSTFILE" --first)}"
read -r -a launch_args <<< "${DS_LAUNCH_ARGS:-}"
exec "${DEEPSPEED:-.venv/bin/deepspeed}" --hostfile "$HOSTFILE" --master_addr "$MASTER_ADDR" \
    --master_port "${MASTER_PORT:-29500}" ${launch_args[@]+"${launch_args[@]}"} \
    --module prism_ds.cli train --no-progress "$@"
