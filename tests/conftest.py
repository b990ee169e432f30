"""Shared fixtures: a tiny 4x4 run trained once per session through the real engine."""
import os

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """(config, pretrain checkpoint, finetune checkpoint) of a tiny run trained in this process."""
    from helpers import tiny_overrides
    from prism_ds.config import load_config
    from prism_ds.engine.trainer import train

    cfg = load_config("sudoku_cpu", tiny_overrides(tmp_path_factory.mktemp("tiny_run")))
    pre = train(cfg, "pretrain", progress=False)
    fine = train(cfg, "finetune", progress=False)
    return cfg, pre, fine


@pytest.fixture(scope="session")
def tiny_llada(tmp_path_factory):
    """Path of a tiny random LLaDA folder (data pairs in its parent's data/)."""
    from helpers import tiny_llada_folder

    return tiny_llada_folder(tmp_path_factory.mktemp("tiny_llada"))
