"""The prism-ds command line: help, data generation, sampling, evaluation, demo, and error reporting."""
import subprocess
import sys

import pytest
import torch

from conftest import tiny_overrides
from prism_ds.cli import main
from prism_ds.sudoku.board import BoardSpec, is_solved, read_csv


def test_console_script_help_lists_subcommands():
    out = subprocess.run([sys.executable, "-m", "prism_ds.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for command in ("train", "sample", "eval", "demo", "gen-sudoku"):
        assert command in out.stdout


@pytest.mark.parametrize("command", ["train", "sample", "eval", "demo", "gen-sudoku"])
def test_each_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    assert "usage: prism-ds" in capsys.readouterr().out


def test_gen_sudoku_writes_valid_boards_and_puzzles(tmp_path):
    assert main(["gen-sudoku", "--box-rows", "2", "--box-cols", "3", "--count", "5", "--out",
                 str(tmp_path / "s.csv")]) == 0
    spec = BoardSpec(2, 3)
    assert is_solved(spec, read_csv(tmp_path / "s.csv", spec)).all()
    assert main(["gen-sudoku", "--count", "3", "--blanks", "51", "--out", str(tmp_path / "p.csv")]) == 0
    assert ((read_csv(tmp_path / "p.csv", BoardSpec(3, 3)) == 0).sum(1) == 51).all()


def test_sample_fills_every_blank_and_keeps_clues(tiny_run, tmp_path, capsys):
    cfg, _, fine = tiny_run
    puzzles = tmp_path / "p.csv"
    main(["gen-sudoku", "--box-rows", "2", "--box-cols", "2", "--count", "8", "--blanks", "8", "--out", str(puzzles)])
    for policy in ("none", "prism", "remdm", "remdm-conf"):
        out = tmp_path / f"{policy}.csv"
        assert main(["sample", "--checkpoint", str(fine), "--puzzles", str(puzzles), "--out", str(out),
                     "--steps", "4", "--policy", policy, "--no-progress"]) == 0
        filled, given = read_csv(out, BoardSpec(2, 2)), read_csv(puzzles, BoardSpec(2, 2))
        assert (filled != 0).all() and torch.equal(filled[given != 0], given[given != 0])
    assert "solved" in capsys.readouterr().out


def test_sample_reports_bad_inputs(tiny_run, tmp_path, capsys):
    _, pre, fine = tiny_run
    bad = tmp_path / "bad.csv"
    bad.write_text("1,2,3\n")
    assert main(["sample", "--checkpoint", str(fine), "--puzzles", str(bad), "--out", str(tmp_path / "o.csv"),
                 "--steps", "2"]) == 2
    assert "bad.csv:1: board has 3 values, expected 19" in capsys.readouterr().err
    good = tmp_path / "good.csv"
    main(["gen-sudoku", "--box-rows", "2", "--box-cols", "2", "--count", "2", "--blanks", "8", "--out", str(good)])
    assert main(["sample", "--checkpoint", str(pre), "--puzzles", str(good), "--out", str(tmp_path / "o.csv"),
                 "--steps", "2", "--policy", "prism"]) == 2
    assert "needs a model with a quality head" in capsys.readouterr().err


def test_eval_rejects_a_board_size_the_checkpoint_was_not_trained_on(tiny_run, tmp_path, capsys):
    cfg, _, fine = tiny_run
    args = ["eval", "--checkpoint", str(fine), "--no-progress", *tiny_overrides(tmp_path)]
    assert main(args + ["data.box_cols=3"]) == 2
    assert "trained on 4x4 boards" in capsys.readouterr().err


def test_bad_override_exits_with_a_named_key(capsys):
    assert main(["train", "--stage", "pretrain", "model.hiddn=3"]) == 2
    assert "unknown key 'model.hiddn'" in capsys.readouterr().err


def test_demo_runs_end_to_end_and_resumes(tmp_path, capsys):
    args = ["demo", "--no-progress", *tiny_overrides(tmp_path, **{"pretrain.steps": 10, "finetune.steps": 10})]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert "| policy | 2 steps | 4 steps |" in first and "| prism |" in first and "| none |" in first
    assert (tmp_path / "results.md").exists()
    assert main(args) == 0  # a second run reuses checkpoints and results
    second = capsys.readouterr().out
    assert "using existing" in second
    assert second.split("Total demo")[0].strip().endswith(first.split("Total demo")[0].strip().splitlines()[-1])
