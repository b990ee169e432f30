"""The CPU Sudoku demo: data, MDM pretraining, PRISM fine-tuning, then vanilla vs remasking policies.

Each stage is skipped when its output already exists in the run dir, so an interrupted demo resumes.
"""
from __future__ import annotations

import time
from pathlib import Path

from prism_ds.config import RunConfig
from prism_ds.engine import distributed as dist_utils
from prism_ds.engine.checkpoint import load_model, read_meta
from prism_ds.engine.trainer import stage_dir, train
from prism_ds.sudoku.data import board_spec, eval_puzzles
from prism_ds.sudoku.evaluate import format_table, success_table


def train_stage(cfg: RunConfig, stage: str, progress: bool = True) -> Path:
    """Train one stage on the run's Sudoku boards unless its final checkpoint exists; returns it."""
    final = stage_dir(cfg, stage) / "final"
    if (final / "meta.json").exists():
        print(f"[prism-ds] {stage}: using existing {final}")
        return final
    return train(cfg, stage, progress)


def evaluate_checkpoint(checkpoint: str | Path, cfg: RunConfig, progress: bool = True) -> str:
    """Success table of a checkpoint on the run's evaluation puzzles; results are cached next to it."""
    device = dist_utils.device()
    model, ckpt_cfg = load_model(checkpoint, device)
    spec = board_spec(ckpt_cfg)
    if board_spec(cfg) != spec:
        raise ValueError(f"{checkpoint} was trained on {spec.n}x{spec.n} boards but data.box_rows/box_cols "
                         f"ask for {board_spec(cfg).n}x{board_spec(cfg).n}")
    puzzles, path = eval_puzzles(cfg, progress)
    # Results depend on the checkpoint, the puzzles and the sampler settings, so they are keyed by all three.
    s = cfg.sampler
    key = (f"{Path(checkpoint).name}_step{read_meta(checkpoint)['step']}_{path.stem}_k{s.remask_k}_{s.unmask_order}"
           f"_T{s.temperature}_p{s.top_p}_seed{s.seed}")
    out_dir = Path(checkpoint).parent
    rows = success_table(model, spec, puzzles.to(device), s, out_dir / f"results_{key}.jsonl", progress)
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(out_dir / "tb_eval" / key)) as writer:  # x axis = number of sampler steps
        for row in rows:
            writer.add_scalar(f"success/{row['policy']}", row["success"], row["steps"])
    header = (f"Success rate on {len(puzzles)} {spec.n}x{spec.n} puzzles with {cfg.data.blanks} blanks "
              f"({path}); remask K={s.remask_k}, unmask order {s.unmask_order}, temperature {s.temperature}")
    return header + "\n\n" + format_table(rows)


def run_demo(cfg: RunConfig, progress: bool = True) -> str:
    """Run every stage of the demo and return the printed results table."""
    t0 = time.time()
    train_stage(cfg, "pretrain", progress)
    final = train_stage(cfg, "finetune", progress)
    if dist_utils.rank() != 0:
        return ""
    table = evaluate_checkpoint(final, cfg, progress)
    report = f"{table}\n\nTotal demo wall time: {time.time() - t0:.0f} s (stages already done were skipped)"
    (Path(cfg.run_dir) / "results.md").write_text(report + "\n")
    return report
