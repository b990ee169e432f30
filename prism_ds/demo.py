"""The CPU Sudoku demo: data, MDM pretraining, PRISM fine-tuning, then vanilla vs remasking policies.

Rerunning the same command resumes: finished stages are reused, an interrupted stage continues from
its last checkpoint, and finished table cells are read back.
"""
from __future__ import annotations

import time
from pathlib import Path

from prism_ds.config import RunConfig
from prism_ds.engine import distributed as dist_utils
from prism_ds.engine.trainer import train
from prism_ds.sudoku.evaluate import evaluate_checkpoint


def run_demo(cfg: RunConfig, progress: bool = True, overwrite: bool = False) -> str:
    """Run every stage of the demo and return the printed results table."""
    t0 = time.time()
    train(cfg, "pretrain", progress, overwrite)
    final = train(cfg, "finetune", progress, overwrite)
    if dist_utils.rank() != 0:
        return ""
    table = evaluate_checkpoint(final, cfg, progress)
    report = f"{table}\n\nTotal demo wall time: {time.time() - t0:.0f} s (stages already done were skipped)"
    (Path(cfg.run_dir) / "results.md").write_text(report + "\n")
    return report
