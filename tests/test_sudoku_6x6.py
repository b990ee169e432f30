"""The 6x6 recipe end to end on a tiny budget: data, three training stages, mechanism report, table, resume."""
from __future__ import annotations

import re

import torch

from prism_ds.cli import main
from prism_ds.config import load_config
from prism_ds.sudoku.board import MASK_ID
from prism_ds.sudoku.data import board_spec, eval_puzzles
from prism_ds.sudoku.mechanism import solutions_of

# The recipe's shapes (6x6 boards, 24 blanks, k = 4, K = 4, its sampler rows), with a tiny DiT and a few steps.
TINY = {"cpu_kernels": "native", "model.hidden": 32, "model.n_blocks": 1, "model.n_heads": 2, "model.cond_dim": 16,
        "data.n_train": 256, "data.n_eval": 12, "pretrain.steps": 6, "pretrain.micro_batch_size": 32,
        "pretrain.warmup_steps": 2, "finetune.steps": 4, "finetune.micro_batch_size": 32, "finetune.warmup_steps": 2,
        "critic.steps": 4, "critic.micro_batch_size": 32, "critic.warmup_steps": 2, "sampler.steps": "[12,8]",
        "sampler.n_seeds": 1, "sampler.batch_size": 12, "sampler.mechanism_puzzles": 8}


def test_6x6_recipe_runs_every_stage_and_reports_every_row(tmp_path, capsys):
    args = ["demo", "--recipe", "sudoku_6x6_cpu", "--no-progress", f"run_dir={tmp_path}",
            *[f"{k}={v}" for k, v in TINY.items()]]
    assert main(args) == 0
    first = capsys.readouterr().out
    cfg = load_config("sudoku_6x6_cpu", [f"run_dir={tmp_path}", *[f"{k}={v}" for k, v in TINY.items()]])
    assert (tmp_path / "critic" / "final" / "meta.json").exists()

    puzzles, _ = eval_puzzles(cfg, progress=False)
    spec = board_spec(cfg)
    assert spec.n == 6 and puzzles.shape == (12, 41)
    assert ((puzzles == MASK_ID).sum(1) == 24).all()  # 67% blank, as 9x9's 51 of 81
    assert torch.equal(solutions_of(spec, puzzles)[:, spec.separator_mask()],  # unique solutions (else it raises)
                       puzzles[:, spec.separator_mask()])

    # The mechanism report scores every cell with each policy's signal, the critic's included.
    mechanism = first[first.index("Detection of wrong cells"):first.index("Success rate on")]
    for score in ("PRISM g", "ReMDM-conf", "leave-one-out", "uniform", "token-critic"):
        assert f"| {score}" in mechanism, score
    assert mechanism.count("### N = ") == 2
    # The success table has every row of the recipe, the Token-Critic baseline's among them.
    for row in cfg.sampler.policies:
        assert re.search(rf"^\| {re.escape(row)} \|", first, re.M), row
    assert "threads" in first and "kernels" in first  # the machine the table was measured on

    assert main(args) == 0  # rerun: every stage, the report and the table are read back
    second = capsys.readouterr().out
    assert second.count("already finished with this config") == 3
    report = lambda out: out[out.index("Detection of wrong cells"):out.index("Total demo")]  # noqa: E731
    assert report(second) == report(first)
