"""The prism-ds command line: help, data generation, sampling, evaluation, demo, and error reporting."""
import shutil
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from helpers import tiny_overrides
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
    assert second.count("already finished with this config") == 2
    assert second.split("Total demo")[0].strip().endswith(first.split("Total demo")[0].strip().splitlines()[-1])


def test_flags_and_overrides_mix_in_any_order():
    from prism_ds.cli import parse_args

    args = parse_args(["train", "--stage", "pretrain", "run_dir=X", "--no-progress", "model.hidden=64",
                       "--recipe", "sudoku_cpu", "seed=3"])
    assert args.overrides == ["run_dir=X", "model.hidden=64", "seed=3"] and args.no_progress and args.stage == "pretrain"
    with pytest.raises(SystemExit):
        parse_args(["train", "--stage", "pretrain", "run_dir=X", "--bogus"])
    with pytest.raises(SystemExit):
        parse_args(["gen-sudoku", "--count", "1", "--out", "x.csv", "seed=3"])  # no overrides here


def test_train_on_a_finished_stage_reuses_it_and_refuses_a_changed_config(tiny_run, capsys):
    cfg, pre, _ = tiny_run
    args = ["train", "--stage", "pretrain", "--no-progress", *tiny_overrides(cfg.run_dir)]
    before = (pre / "backbone.safetensors").read_bytes()
    assert main(args) == 0
    assert "already finished with this config" in capsys.readouterr().out
    # A changed setting that shapes training is refused, naming the key; bookkeeping keys are not.
    assert main(args + ["model.dropout=0.1", "pretrain.lr=0.01"]) == 2
    err = capsys.readouterr().err
    assert "model.dropout: 0.0 -> 0.1" in err and "pretrain.lr" in err and "--overwrite" in err
    assert main(args + ["pretrain.log_every=7", "sampler.steps=[3]"]) == 0
    assert (pre / "backbone.safetensors").read_bytes() == before
    capsys.readouterr()


def test_overwrite_and_resume_false_train_a_finished_stage_again(tmp_path, capsys):
    args = ["train", "--stage", "pretrain", "--no-progress", *tiny_overrides(tmp_path, **{"pretrain.steps": 4})]
    assert main(args) == 0
    final = tmp_path / "pretrain" / "final" / "backbone.safetensors"
    first = final.read_bytes()
    assert main(args + ["pretrain.steps=6"]) == 2  # a different step count is a different run
    assert "pretrain.steps: 4 -> 6" in capsys.readouterr().err
    assert main(args + ["pretrain.steps=6", "--overwrite"]) == 0
    assert "starting over" in capsys.readouterr().out and final.read_bytes() != first
    assert main(args + ["pretrain.resume=false", "seed=1"]) == 0
    assert "starting over" in capsys.readouterr().out


def test_a_finished_finetune_is_not_reused_once_its_pretrained_backbone_changed(tmp_path, capsys):
    args = lambda stage, *extra: ["train", "--stage", stage, "--no-progress", *tiny_overrides(  # noqa: E731
        tmp_path, **{"pretrain.steps": 3, "finetune.steps": 2}), *extra]
    assert main(args("pretrain")) == 0 and main(args("finetune")) == 0
    assert main(args("finetune")) == 0 and "already finished" in capsys.readouterr().out
    # Pretraining again with another learning rate changes no finetune.* key, only the starting weights.
    assert main(args("pretrain", "--overwrite", "pretrain.lr=0.01")) == 0
    capsys.readouterr()
    assert main(args("finetune", "pretrain.lr=0.01")) == 2
    err = capsys.readouterr().err
    assert "the weights it started from (pretrain/final) have changed" in err and "pretrain.lr" not in err


def test_resuming_a_checkpoint_with_a_changed_objective_is_refused(tmp_path, capsys):
    args = ["train", "--stage", "pretrain", "--no-progress",
            *tiny_overrides(tmp_path, **{"pretrain.steps": 4, "pretrain.ckpt_every": 2})]
    assert main(args) == 0
    shutil.rmtree(tmp_path / "pretrain" / "final")  # as if the run had been interrupted after its last checkpoint
    assert main(args + ["masking.eps=0.01"]) == 2
    err = capsys.readouterr().err
    assert "cannot resume" in err and "masking.eps: 0.001 -> 0.01" in err


def test_eval_results_are_keyed_on_checkpoint_content_not_its_step(tiny_run, tmp_path):
    from prism_ds.config import load_config
    from prism_ds.engine.trainer import train
    from prism_ds.sudoku.data import eval_puzzles
    from prism_ds.sudoku.evaluate import results_key

    cfg, _, fine = tiny_run
    puzzles = eval_puzzles(cfg, progress=False)[1]
    key = results_key(fine, puzzles, cfg.sampler)
    # The same step count retrained with another seed is a different checkpoint.
    other = load_config("sudoku_cpu", tiny_overrides(tmp_path, **{"pretrain.steps": 4, "finetune.steps": 4}))
    a = train(other, "pretrain", progress=False)
    other.seed = 1
    other.run_dir = str(tmp_path / "b")
    b = train(other, "pretrain", progress=False)
    assert results_key(a, puzzles, cfg.sampler) != results_key(b, puzzles, cfg.sampler)
    # Every sampler setting that changes a cell changes the key; the list of cells does not.
    assert results_key(fine, puzzles, replace(cfg.sampler, temperature=0.5)) != key
    assert results_key(fine, puzzles, replace(cfg.sampler, eta=0.5)) != key
    assert results_key(fine, puzzles, replace(cfg.sampler, steps=[9], policies=["none"], n_seeds=3)) == key
