"""PRISM fine-tuning of a tiny random LLaDA through the path a user's 8B download takes: the folder is loaded
with from_pretrained under ZeRO-3, LoRA on q/k/v, the projection+linear head, export, reload."""
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import prism_ds.engine.trainer as trainer
from helpers import REPO, free_port, read_scalars, subprocess_env
from prism_ds.config import load_config
from prism_ds.models.llada import LLaDAConfig
from prism_ds.models.loading import load_model
from prism_ds.models.weights import read_meta


def _overrides(tiny_llada, run_dir, **extra) -> list[str]:
    data = tiny_llada.parent / "data"
    values = {"run_dir": str(run_dir), "model.path": str(tiny_llada), "text.source": str(data / "train.jsonl"),
              "text.heldout_source": str(data / "heldout.jsonl"), "text.max_length": 96, "finetune.steps": 3,
              "finetune.log_every": 1, "finetune.calib_every": 3, "finetune.ckpt_every": 3, "lora.r": 4,
              "lora.alpha": 8}
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def _probe_tokens(cfg) -> torch.Tensor:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(cfg.model.path)
    ids = tok.apply_chat_template([{"role": "user", "content": "Write a function to add two numbers."}],
                                  add_generation_prompt=True, tokenize=False)
    ids = tok(ids + "def add(a, b):", add_special_tokens=False)["input_ids"]
    x = torch.tensor([ids, ids])
    x[1, -3:] = 126336  # a masked tail: the unmasking logits matter there
    return x


def test_zero3_prism_finetune_changes_only_lora_and_head_and_the_export_reproduces_it(tiny_llada, tmp_path,
                                                                                       monkeypatch):
    cfg = load_config("llada_tiny", _overrides(tiny_llada, tmp_path / "run"))
    probe, seen = _probe_tokens(cfg), {}
    real_export = trainer.export_trainable

    def spy(model, *args, **kwargs):  # the engine's module at the end of training, ZeRO-3 partitioned
        import deepspeed

        model.eval()
        with torch.no_grad():
            out = model(probe)
            seen["logits"], seen["quality"] = out.logits.clone(), out.quality.clone()
        for name, p in model.named_parameters():
            with deepspeed.zero.GatheredParameters([p]):
                seen[name] = p.detach().clone()
        model.train()
        return real_export(model, *args, **kwargs)

    monkeypatch.setattr(trainer, "export_trainable", spy)
    final = trainer.train(cfg, "finetune", progress=False)
    base = {}
    for shard in tiny_llada.glob("model-*.safetensors"):
        base |= load_file(str(shard))
    prefix = "backbone.model.base_model.model."
    frozen = {n for n in seen if n.startswith(prefix) and "lora_" not in n}
    assert len(frozen) == len(base)
    for name in frozen:  # every base weight is exactly the downloaded one (peft renames q_proj.weight)
        assert torch.equal(seen[name], base[name.removeprefix(prefix).replace(".base_layer", "")]), name
    lora_b = [n for n in seen if "lora_B" in n]
    assert len(lora_b) == 2 * 3 and all(seen[n].abs().sum() > 0 for n in lora_b)  # zero-init, then trained
    assert seen["quality_head.net.3.weight"].abs().sum() > 0  # the head's zero-init output layer trained
    # The export holds the adapter in peft's format and the head, never the base.
    assert (final / "adapter" / "adapter_config.json").exists() and (final / "adapter" / "adapter_model.safetensors").exists()
    assert not (final / "backbone.safetensors").exists()
    assert sum(f.stat().st_size for f in final.rglob("*") if f.is_file()) < 2_000_000
    model, loaded_cfg = load_model(final)
    with torch.no_grad():
        out = model(probe)
    assert torch.equal(out.logits, seen["logits"]) and torch.equal(out.quality, seen["quality"])
    merged, _ = load_model(final, merge_adapter=True)
    with torch.no_grad():
        out_merged = merged(probe)
    assert torch.allclose(out_merged.logits, seen["logits"], atol=1e-4)
    assert torch.allclose(out_merged.quality, seen["quality"], atol=1e-4)
    scalars = read_scalars(final.parent / "tb")
    for tag in ("loss/prism", "loss/mdm", "data/padding_fraction", "data/truncated", "calibration/ece", "grad_norm"):
        assert tag in scalars, tag


@pytest.mark.slow
def test_two_rank_zero3_run_exports_what_deepspeed_checkpointed(tiny_llada, tmp_path):
    """2 CPU ranks; the reloaded export equals the model rebuilt from DeepSpeed's own ZeRO-3 checkpoint."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from prism_ds.models.loading import build_pretrained_model

    launcher = REPO / ".venv" / "bin" / "deepspeed"
    launcher = launcher if launcher.exists() else type(launcher)(sys.executable).parent / "deepspeed"
    args = ["train", "--stage", "finetune", "--recipe", "llada_tiny", "--no-progress",
            *_overrides(tiny_llada, tmp_path / "run", **{"finetune.steps": 2, "finetune.ckpt_every": 2})]
    proc = subprocess.run([str(launcher), "--num_gpus", "2", "--master_port", str(free_port()), "--module",
                           "prism_ds.cli", *args], env=subprocess_env(), cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    final = tmp_path / "run" / "finetune" / "final"
    model, cfg = load_model(final)
    state = get_fp32_state_dict_from_zero_checkpoint(str(final.parent / "checkpoints"), tag="step00000002",
                                                     exclude_frozen_parameters=True)
    assert state and all("lora_" in k or k.startswith("quality_head.") for k in state)
    torch.manual_seed(0)
    rebuilt = build_pretrained_model(cfg, with_head=True, train_backbone=True).eval()
    missing, unexpected = rebuilt.load_state_dict(state, strict=False)
    assert not unexpected and all("lora_" not in k and not k.startswith("quality_head") for k in missing)
    probe = _probe_tokens(cfg)
    with torch.no_grad():
        a, b = model(probe), rebuilt(probe)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.quality, b.quality)


def test_flop_counts_frozen_weights_without_weight_gradients():
    import importlib.util

    from prism_ds.engine.monitor import train_flops_per_token

    assert train_flops_per_token(100, 10, backbone_trains=True) == 2 * 100 + 2 * 100 + 2 * 10
    assert train_flops_per_token(100, 10, backbone_trains=False) == 2 * 100 + 2 * 10  # head only
    spec = importlib.util.spec_from_file_location("bench_llada", REPO / "eval" / "bench_llada.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    cfg = LLaDAConfig(d_model=8, n_heads=2, n_layers=1, mlp_hidden_size=16, vocab_size=10, embedding_size=10)
    body, vocab, attention = 4 * 8 * 8 + 3 * 8 * 16, 10 * 8, 4 * 5 * 8  # per token; seq 5
    z, y = 4 * (body + vocab) + 3 * attention, 4 * body + 3 * attention
    assert bench.step_flops(cfg, n_trainable=7, tokens=3, seq=5) == 3 * (z + y + 4 * 7)


@pytest.mark.slow
def test_llada_benchmark_runs_at_tiny_size():
    proc = subprocess.run([sys.executable, str(REPO / "eval" / "bench_llada.py"), "--size", "tiny", "--seq", "64",
                           "--steps", "1", "--warmup", "1", "--lora-r", "8"], env=subprocess_env(), cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "sequence tokens/s" in proc.stdout and "LLaDA tiny" in proc.stdout


def test_finetuning_a_folder_starts_from_this_runs_pretraining_of_it(tiny_llada, tmp_path):
    """model.kind=llada with a pretraining stage (an MDM trained from the folder's weights): fine-tuning
    starts from that export, and the reloaded fine-tuned model (LoRA over a frozen base) carries it."""
    over = _overrides(tiny_llada, tmp_path / "run", **{"pretrain.steps": 2, "pretrain.micro_batch_size": 2,
                                                       "pretrain.ds_config": "zero2.json", "lora.r": 0})
    cfg = load_config("llada_tiny", over)
    pre = trainer.train(cfg, "pretrain", progress=False)
    trained = load_file(str(pre / "backbone.safetensors"))
    name = "model.model.transformer.blocks.0.q_proj.weight"
    original = {}
    for shard in tiny_llada.glob("model-*.safetensors"):
        original |= load_file(str(shard))
    assert not torch.equal(trained[name], original[name.removeprefix("model.")])  # pretraining moved it
    cfg = load_config("llada_tiny", over[:-1] + ["lora.r=4"])
    fine = trainer.train(cfg, "finetune", progress=False)
    model, _ = load_model(fine)
    base_q = model.backbone.model.base_model.model.model.transformer.blocks[0].q_proj.base_layer.weight
    assert torch.equal(base_q, trained[name])
    assert read_meta(fine)["init_backbone"] == str(pre.resolve())
