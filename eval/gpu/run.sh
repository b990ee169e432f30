#!/usr/bin/env bash
# The GPU acceptance kit, run on the lent GPU machine (or with --cpu-smoke anywhere, as CI does):
#   bash eval/gpu/run.sh OUTDIR [--quick | --cpu-smoke]
# On the GPU machine it first installs the wheels eval/gpu/prepare.sh put in .gpu/wheels (carried with the call)
# into a private target, offline, then runs eval/gpu/kit.py: figures go to OUTDIR/gpu_kit.md step by step, every
# command's output to OUTDIR/gpu_kit.log. --cpu-smoke uses this checkout's .venv and needs no wheels.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUTDIR="${1:?usage: bash eval/gpu/run.sh OUTDIR [--quick | --cpu-smoke]}"
MODE=full
case "${2:-}" in
  --quick) MODE=quick ;;
  --cpu-smoke) MODE=cpu-smoke ;;
  "") ;;
  *) echo "run.sh: unknown option ${2} (expected --quick or --cpu-smoke)" >&2; exit 2 ;;
esac
mkdir -p "$OUTDIR"
if [ "$MODE" = cpu-smoke ]; then
  PY="${PYTHON:-.venv/bin/python}"
  export DS_ACCELERATOR=cpu
else
  PY="${PYTHON:-python3}"
  SITE="${PRISM_GPU_SITE:-/tmp/prism-gpu-site}"
  if [ -d .gpu/wheels ]; then
    t0=$(date +%s)
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
      .gpu/wheels/*.whl 2>&1 | grep -v "Running pip as the 'root' user" || true
    echo "[gpu kit] installed $(ls .gpu/wheels | wc -l) carried wheels into $SITE in $(( $(date +%s) - t0 )) s"
  else
    echo "[gpu kit] no .gpu/wheels: run eval/gpu/prepare.sh here and name .gpu in the call's carry" >&2
  fi
  # The carried wheels first; prism-ds itself runs from this checkout (python -m prism_ds.cli).
  export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
  "$PY" -c "import deepspeed, datasets, evalplus" \
    || { echo "[gpu kit] the carried packages do not import" >&2; exit 3; }
fi
exec "$PY" eval/gpu/kit.py "$OUTDIR" --mode "$MODE"
