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
.venv/bin/python - <<'PY'
import torch
import prism_ds

model, cfg = prism_ds.load_model("runs/llada-tiny/finetune/final")
merged, _ = prism_ds.load_model("runs/llada-tiny/finetune/final", merge_adapter=True)
tokens = torch.randint(0, 126080, (2, 32))
with torch.no_grad():
    out, fast = model(tokens), merged(tokens)
print(f"reloaded {cfg.model.path} + LoRA adapter + {cfg.quality_head.kind} head: logits {tuple(out.logits.shape)}, "
      f"quality {tuple(out.quality.shape)}; merged adapter max |d logit| = "
      f"{(out.logits - fast.logits).abs().max():.2e}")
PY
