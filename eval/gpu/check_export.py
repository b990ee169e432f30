"""The GPU kit's reload check: `prism_ds.load_model` on a fine-tuning export, one forward pass on the device, and the
dtype and device of each part (what a user's script does first after training).

    python eval/gpu/check_export.py EXPORT_DIR
"""
from __future__ import annotations

import sys
import time

import torch

import prism_ds


def main(export: str) -> None:
    """Load the export (and its merged-adapter form), run one batch, print one Markdown line per check."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    t0 = time.perf_counter()
    model, cfg = prism_ds.load_model(export)
    model.to(device).eval()
    merged, _ = prism_ds.load_model(export, merge_adapter=True)
    merged.to(device).eval()
    loaded = time.perf_counter() - t0
    tokens = torch.randint(0, 126080, (2, 64), device=device)
    with torch.no_grad():
        out, fast = model(tokens), merged(tokens)
    parts = {"backbone": next(model.backbone.parameters()), "quality head": next(model.quality_head.parameters())}
    print(f"- load_model({export}): {loaded:.1f} s for the model and its merged-adapter copy; "
          + ", ".join(f"{name} {p.dtype} on {p.device}" for name, p in parts.items()))
    print(f"- forward: logits {tuple(out.logits.shape)} {out.logits.dtype}, quality {tuple(out.quality.shape)} "
          f"{out.quality.dtype}; finite: {bool(out.logits.isfinite().all() and out.quality.isfinite().all())}; "
          f"merged adapter max |d logit| = {(out.logits.float() - fast.logits.float()).abs().max():.2e}")


if __name__ == "__main__":
    main(sys.argv[1])
