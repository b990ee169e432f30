"""Training boards and evaluation puzzles for a run: read the configured CSVs or generate and cache them."""
from __future__ import annotations

from pathlib import Path

import torch

from prism_ds.config import RunConfig
from prism_ds.sudoku.board import BoardSpec, is_solved, read_csv, write_csv
from prism_ds.sudoku.generator import make_puzzles, random_solutions


def board_spec(cfg: RunConfig) -> BoardSpec:
    """The board geometry of a run."""
    return BoardSpec(cfg.data.box_rows, cfg.data.box_cols)


def train_boards(cfg: RunConfig, progress: bool = True) -> torch.Tensor:
    """Solved training boards [N, L]: data.train_csv, or n_train generated boards cached in the run dir."""
    spec, d = board_spec(cfg), cfg.data
    path = Path(d.train_csv) if d.train_csv else Path(cfg.run_dir) / "data" / f"train_{spec.n}x{spec.n}_{d.n_train}.csv"
    if d.train_csv or path.exists():
        boards = read_csv(path, spec)
    else:
        boards = random_solutions(spec, d.n_train, seed=d.seed, progress=progress)
        write_csv(path, boards)
    bad = (~is_solved(spec, boards)).nonzero()
    if len(bad):
        raise ValueError(f"{path}:{int(bad[0, 0]) + 1}: training boards must be complete, valid solutions "
                         f"({len(bad)} rows are not)")
    return boards


def eval_puzzles(cfg: RunConfig, progress: bool = True) -> tuple[torch.Tensor, Path]:
    """Evaluation puzzles [N, L] (0 = blank): data.eval_csv, or n_eval generated unique-solution puzzles."""
    spec, d = board_spec(cfg), cfg.data
    default = Path(cfg.run_dir) / "data" / f"eval_{spec.n}x{spec.n}_{d.blanks}blanks_{d.n_eval}.csv"
    path = Path(d.eval_csv) if d.eval_csv else default
    if d.eval_csv or path.exists():
        return read_csv(path, spec), path
    puzzles = make_puzzles(spec, d.n_eval, d.blanks, seed=d.seed + 1, progress=progress)
    write_csv(path, puzzles)
    return puzzles, path
