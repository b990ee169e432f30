"""EMA of the paper's fine-tuning: the recipes' settings, the ZeRO-3 refusal, and that `final/` (what eval,
text-eval and load_model read) holds the EMA shadow of every trained parameter, not the last step's weights."""
import pytest
import torch
from safetensors.torch import load_file

import prism_ds.engine.trainer as trainer
from helpers import tiny_overrides
from prism_ds.config import ConfigError, load_config
from prism_ds.models.loading import load_model
from prism_ds.engine.distributed import build_ds_config
from prism_ds.engine.ema import EMA


@pytest.mark.parametrize("recipe, stages", [("owt_gpu", ["finetune"]), ("sudoku_9x9_gpu", ["pretrain", "finetune"])])
def test_paper_recipes_train_with_the_authors_ema_and_constant_warmup(recipe, stages):
    """The authors' configs/config.yaml: training.ema 0.9999 and lr_scheduler constant_warmup (2500 steps)."""
    cfg = load_config(recipe)
    for stage in stages:
        s = getattr(cfg, stage)
        assert s.ema_decay == 0.9999, stage
        assert (s.warmup_steps, s.warmup_ratio, s.lr_schedule) == (2500, 0.0, "constant_with_warmup"), stage
        assert s.warmup_steps < s.steps, stage
        # EMA needs ZeRO <= 2, so the recipe's DeepSpeed config must be one the trainer accepts with it.
        assert build_ds_config(s, stage, 1).get("zero_optimization", {}).get("stage", 0) <= 2, stage


def test_ema_under_zero3_is_refused_naming_the_keys_and_keeps_what_was_there(tmp_path):
    cfg = load_config("sudoku_cpu", tiny_overrides(tmp_path, **{"finetune.ema_decay": 0.9, "finetune.resume": False,
                                                                "finetune.ds_config": "zero3.json"}))
    earlier = tmp_path / "finetune" / "checkpoints" / "step00000010"
    earlier.mkdir(parents=True)  # what an earlier run left: a refused run must not delete it
    with pytest.raises(ConfigError, match=r"finetune\.ema_decay=0\.9 needs ZeRO stage <= 2, but "
                                          r"finetune\.ds_config=zero3\.json uses stage 3 .*set finetune\.ema_decay=0"):
        trainer.train(cfg, "finetune", progress=False)
    assert earlier.exists()


def _spy_on_ema(monkeypatch) -> dict:
    """Patch the trainer's EMA to keep the shadow's start, every live state it averaged, and itself."""
    seen: dict = {"live": []}

    class Spy(EMA):
        def __init__(self, module, decay):
            super().__init__(module, decay)
            seen["ema"] = self
            seen["start"] = {k: v.detach().float().clone() for k, v in module.named_parameters()}

        def update(self, module):
            super().update(module)
            seen["live"].append({k: v.detach().float().clone() for k, v in module.named_parameters()})

    monkeypatch.setattr(trainer, "EMA", Spy)
    return seen


def _expected_ema(seen: dict, decay: float) -> dict[str, torch.Tensor]:
    """The EMA recomputed from the recorded trajectory with the same fp32 lerp and MDLM's warm-up: the n-th
    update uses min(decay, (1 + n) / (10 + n)) (the authors' models/ema.py)."""
    shadow = {k: v.clone() for k, v in seen["start"].items()}
    for n, live in enumerate(seen["live"], 1):
        for k in shadow:
            shadow[k].lerp_(live[k], 1.0 - min(decay, (1 + n) / (10 + n)))
    return shadow


def test_finetune_with_ema_exports_the_shadow_of_backbone_and_head_not_the_last_step(tiny_run, tmp_path,
                                                                                     monkeypatch):
    _, pre, _ = tiny_run
    decay, steps = 0.5, 6  # far from both the start and the last step after a few steps
    cfg = load_config("sudoku_cpu", tiny_overrides(tmp_path, **{
        "finetune.init_from": str(pre), "finetune.ema_decay": decay, "finetune.steps": steps,
        "finetune.ckpt_every": steps, "finetune.calib_every": steps}))
    seen = _spy_on_ema(monkeypatch)
    final = trainer.train(cfg, "finetune", progress=False)
    assert len(seen["live"]) == steps  # one update per optimizer step
    expected, last = _expected_ema(seen, decay), seen["live"][-1]
    exported = {f"backbone.{k}": v for k, v in load_file(str(final / "backbone.safetensors")).items()}
    exported |= {f"quality_head.{k}": v for k, v in load_file(str(final / "quality_head.safetensors")).items()}
    trained = [k for k, v in seen["start"].items() if not torch.equal(v, last[k])]
    assert any(k.startswith("backbone.") for k in trained) and any(k.startswith("quality_head.") for k in trained)
    for name in trained:  # every parameter that trained is exported as its EMA, not as its last value
        assert torch.equal(exported[name], expected[name]), name
        assert not torch.equal(exported[name], last[name]), name
    assert set(expected) <= set(exported)
    assert all(torch.equal(exported[k], expected[k]) for k in expected)
    # What eval / text-eval / sample read: load_model gives the EMA weights, zero-initialised head layer included.
    model, _ = load_model(final)
    loaded = dict(model.named_parameters())
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)
    head_out = [k for k in trained if k.startswith("quality_head.") and torch.equal(seen["start"][k], 0 * last[k])]
    assert head_out and all(loaded[k].abs().sum() > 0 for k in head_out)  # the zero-init output layer, averaged


def test_lora_finetune_with_ema_exports_the_averaged_adapters_and_head(tiny_llada, tmp_path, monkeypatch):
    """LoRA under ZeRO-2 with EMA: the adapters are picked out of the frozen base by requires_grad, so the
    shadow must keep those flags (it exported an empty adapter when they were all off)."""
    data = tiny_llada.parent / "data"
    decay = 0.5
    over = {"run_dir": str(tmp_path / "run"), "model.path": str(tiny_llada), "text.source": str(data / "train.jsonl"),
            "text.heldout_source": str(data / "heldout.jsonl"), "text.max_length": 96, "finetune.steps": 3,
            "finetune.log_every": 1, "finetune.calib_every": 3, "finetune.ckpt_every": 3, "lora.r": 4,
            "lora.alpha": 8, "finetune.ds_config": "zero2.json", "finetune.ema_decay": decay}
    cfg = load_config("llada_tiny", [f"{k}={v}" for k, v in over.items()])
    seen = _spy_on_ema(monkeypatch)
    final = trainer.train(cfg, "finetune", progress=False)
    expected, last = _expected_ema(seen, decay), seen["live"][-1]
    assert len(load_file(str(final / "adapter" / "adapter_model.safetensors"))) == 2 * 2 * 3  # A and B of q, k, v
    model, _ = load_model(final)
    loaded = dict(model.named_parameters())
    averaged = [k for k in expected if "lora_" in k or k.startswith("quality_head.")]
    assert len(averaged) > 12 and all(k in loaded for k in averaged)
    for name in averaged:
        assert torch.equal(loaded[name], expected[name]), name
    moved = [k for k in averaged if not torch.equal(seen["start"][k], last[k])]
    assert any("lora_B" in k for k in moved) and any(k.startswith("quality_head.") for k in moved)
    assert all(not torch.equal(loaded[k], last[k]) for k in moved)
