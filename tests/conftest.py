"""Shared fixtures: a tiny 4x4 run trained once per session through the real engine."""
import os

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")


def tiny_overrides(run_dir, **extra) -> list[str]:
    """Overrides that shrink the CPU recipe to seconds: 4x4 boards and a one-block DiT."""
    values = {"run_dir": str(run_dir), "data.box_rows": 2, "data.box_cols": 2, "data.n_train": 300,
              "data.n_eval": 40, "data.blanks": 8, "model.hidden": 32, "model.n_blocks": 1, "model.n_heads": 2,
              "model.cond_dim": 16, "pretrain.steps": 40, "pretrain.micro_batch_size": 32, "pretrain.log_every": 10,
              "pretrain.warmup_steps": 5, "finetune.steps": 30, "finetune.micro_batch_size": 32,
              "finetune.log_every": 10, "finetune.warmup_steps": 5, "prism.k": 2, "sampler.steps": "[2,4]",
              "sampler.batch_size": 40}
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """(config, pretrain checkpoint, finetune checkpoint) of a tiny run trained in this process."""
    from prism_ds.config import load_config
    from prism_ds.demo import train_stage

    cfg = load_config("sudoku_cpu", tiny_overrides(tmp_path_factory.mktemp("tiny_run")))
    pre = train_stage(cfg, "pretrain", progress=False)
    fine = train_stage(cfg, "finetune", progress=False)
    return cfg, pre, fine
