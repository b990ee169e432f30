"""Recipes, dotted overrides and configuration errors."""
import json

import pytest

from prism_ds.config import ConfigError, RECIPES_DIR, load_config
from prism_ds.config import StageConfig
from prism_ds.engine.distributed import build_ds_config


def test_every_shipped_recipe_loads():
    names = [p.stem for p in RECIPES_DIR.glob("*.yaml")]
    assert "sudoku_cpu" in names and "sudoku_9x9_gpu" in names
    for name in names:
        load_config(name)


def test_dotted_overrides_are_typed():
    cfg = load_config("sudoku_cpu", ["model.hidden=256", "prism.lam=0.5", "sampler.steps=[3,5]",
                                     "finetune.freeze_backbone=true", "pretrain.lr=1e-3"])
    assert cfg.model.hidden == 256 and cfg.prism.lam == 0.5 and cfg.sampler.steps == [3, 5]
    assert cfg.finetune.freeze_backbone is True and cfg.pretrain.lr == 1e-3


@pytest.mark.parametrize("override,message", [
    ("model.hiden=3", r"unknown key 'model.hiden'"),
    ("nothing=1", r"unknown key 'nothing'"),
    ("model.hidden=big", r"model.hidden: expected int, got 'big'"),
    ("model", r"expected key.sub=value"),
])
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("sudoku_cpu", [override])


def test_unknown_key_in_recipe_names_the_file(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("model:\n  hidden: 64\n  layers: 3\n")
    with pytest.raises(ConfigError, match=r"r.yaml: unknown key 'model.layers'"):
        load_config(str(path))
    with pytest.raises(ConfigError, match="recipe 'nope' not found"):
        load_config("nope")


def test_ds_config_auto_values_are_filled_and_conflicts_are_errors(tmp_path):
    stage = StageConfig(micro_batch_size=16, grad_accum=2, grad_clip=0.5)
    cfg = build_ds_config(stage, "finetune", n_ranks=2)
    assert cfg["train_micro_batch_size_per_gpu"] == 16 and cfg["train_batch_size"] == 64
    assert cfg["gradient_clipping"] == 0.5 and cfg["zero_optimization"]["stage"] == 2
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_micro_batch_size_per_gpu": 8, "zero_optimization": {"stage": 3}}))
    stage.ds_config = str(path)
    with pytest.raises(ConfigError, match=r"ds.json: 'train_micro_batch_size_per_gpu' is 8 .*finetune.micro_batch_size"):
        build_ds_config(stage, "finetune", n_ranks=1)
    path.write_text(json.dumps({"train_batch_size": 32}))
    with pytest.raises(ConfigError, match=r"'train_batch_size' is 32 but the run config gives 64"):
        build_ds_config(stage, "finetune", n_ranks=2)


def test_config_diff_counts_training_keys_and_takes_new_keys_at_their_defaults():
    from prism_ds.config import to_dict
    from prism_ds.engine.resume import config_diff

    current = to_dict(load_config("sudoku_cpu"))
    older = {k: v for k, v in current.items() if k not in ("lora", "codeeval")}  # saved before those existed
    older["model"] = {k: v for k, v in current["model"].items() if k not in ("kind", "path")}
    assert config_diff(older, current, "finetune") == []
    changed = load_config("sudoku_cpu", ["prism.k=3", "sampler.steps=[9]", "finetune.log_every=3",
                                         "model.gradient_checkpointing=true", "pretrain.lr=0.1"])
    assert config_diff(current, to_dict(changed), "finetune") == ["prism.k: 2 -> 3"]
    assert config_diff(current, to_dict(changed), "pretrain") == ["pretrain.lr: 0.003 -> 0.1"]
