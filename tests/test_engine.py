"""The DeepSpeed engine: single-process stages, checkpoints, TensorBoard, 2-rank ZeRO-3, Ctrl-C."""
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from helpers import REPO, read_scalars, subprocess_env, tiny_overrides
from prism_ds.config import ConfigError, load_config
from prism_ds.core.objective import compute_losses
from prism_ds.engine.checkpoint import export_trainable
from prism_ds.models.loading import load_model
from prism_ds.models.prism_model import build_model
from prism_ds.models.weights import read_meta
from prism_ds.sudoku.board import MASK_ID
from prism_ds.sudoku.data import board_spec, train_boards



def _mdm_loss(model, cfg, boards, seed=0):
    spec = board_spec(cfg)
    fixed = spec.separator_mask()[None].expand(len(boards), -1)
    with torch.no_grad():
        return compute_losses(model, boards, fixed, MASK_ID, "pretrain", cfg.masking, cfg.prism,
                              generator=torch.Generator().manual_seed(seed)).mdm.item()


def test_pretraining_lowers_the_mdm_loss(tiny_run):
    cfg, pre, _ = tiny_run
    boards = train_boards(cfg, progress=False)[:256]
    trained, _ = load_model(pre)
    torch.manual_seed(cfg.seed)
    untrained = build_model(cfg.model, cfg.quality_head, board_spec(cfg).vocab_size, with_head=False).eval()
    assert _mdm_loss(trained, cfg, boards) < 0.9 * _mdm_loss(untrained, cfg, boards)
    assert read_meta(pre)["step"] == cfg.pretrain.steps


def test_finetune_logs_every_monitored_scalar(tiny_run):
    cfg, _, fine = tiny_run
    scalars = read_scalars(fine.parent / "tb")
    for tag in ("loss/total", "loss/mdm", "loss/prism", "lr/backbone", "lr/quality_head", "grad_norm",
                "throughput/tokens_per_s", "throughput/samples_per_s", "data/padding_fraction",
                "quality/auroc", "quality/frac_correct"):
        assert tag in scalars and len(scalars[tag]) == 3, tag
    assert (fine.parent / "config.yaml").exists()


def test_checkpoint_round_trip_gives_identical_outputs(tiny_run, tmp_path):
    cfg, _, fine = tiny_run
    model, loaded_cfg = load_model(fine)
    assert loaded_cfg == cfg
    tokens = torch.randint(0, board_spec(cfg).vocab_size, (4, board_spec(cfg).seq_len))
    out = model(tokens)
    export_trainable(model, cfg, tmp_path / "copy", read_meta(fine), is_writer=True)
    again, _ = load_model(tmp_path / "copy")
    out2 = again(tokens)
    assert torch.equal(out.logits, out2.logits) and torch.equal(out.quality, out2.quality)
    assert not (tmp_path / "copy.tmp").exists()


def test_finetune_starts_from_the_pretrained_backbone_and_frozen_backbone_stays_fixed(tiny_run, tmp_path):
    from prism_ds.engine.trainer import train as train_stage

    cfg, pre, _ = tiny_run
    frozen_cfg = load_config("sudoku_cpu", tiny_overrides(cfg.run_dir, **{
        "finetune.freeze_backbone": "true", "finetune.steps": 5, "finetune.init_from": str(pre)}))
    frozen_cfg.run_dir = str(tmp_path / "frozen")
    ckpt = train_stage(frozen_cfg, "finetune", progress=False)
    assert not (ckpt / "backbone.safetensors").exists()  # a frozen backbone is never written again
    before = load_file(str(pre / "backbone.safetensors"))
    model, _ = load_model(ckpt)
    after = model.backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    head = load_file(str(ckpt / "quality_head.safetensors"))
    assert any(v.abs().sum() > 0 for k, v in head.items() if "linear.weight" in k)  # the head did train


def test_bad_training_settings_are_named(tiny_run, tmp_path):
    from prism_ds.engine.trainer import train as train_stage

    cfg, pre, _ = tiny_run
    bad = load_config("sudoku_cpu", tiny_overrides(tmp_path, **{"prism.k": 99, "finetune.init_from": str(pre)}))
    with pytest.raises(ConfigError, match=r"prism.k=99 exceeds the 16 maskable positions"):
        train_stage(bad, "finetune", progress=False)
    wrong = load_config("sudoku_cpu", tiny_overrides(tmp_path, **{"model.hidden": 64, "finetune.init_from": str(pre)}))
    with pytest.raises(ValueError, match=r"backbone.safetensors: .* has shape \(192,\) but this model.\* config builds \(384,\)"):
        train_stage(wrong, "finetune", progress=False)


def test_pretrain_init_from_is_rejected(tmp_path):
    from prism_ds.engine.trainer import train as train_stage

    cfg = load_config("sudoku_cpu", tiny_overrides(tmp_path, **{"pretrain.init_from": "x"}))
    with pytest.raises(ConfigError, match="pretrain.init_from is not supported"):
        train_stage(cfg, "pretrain", progress=False)


def test_ema_is_fp32_and_moves_where_a_bf16_copy_would_not():
    from prism_ds.engine.ema import EMA

    model = torch.nn.Linear(64, 64).to(torch.bfloat16)
    ema = EMA(model, decay=0.9999)
    assert all(p.dtype == torch.float32 for p in ema.module.parameters())
    start = ema.module.weight.clone()
    ema.updates = 10 ** 6  # past MDLM's warm-up (tested in test_ema.py): the plain 0.9999 decay, the hard case for bf16
    with torch.no_grad():
        model.weight.add_(0.5)
    for _ in range(10):
        ema.update(model)
    moved = (ema.module.weight - start).abs().mean().item()
    assert moved == pytest.approx(0.5 * (1 - 0.9999 ** 10), rel=0.05)
    # The same update kept in bf16 is lost to rounding for typical weights.
    bf16 = start.to(torch.bfloat16)
    bf16_after = bf16.lerp(model.weight, 1e-4)
    assert (bf16_after == bf16).float().mean() > 0.5


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_and_the_same_command_resumes(tmp_path):
    cmd = [sys.executable, "-m", "prism_ds.cli", "train", "--stage", "pretrain", "--no-progress",
           *tiny_overrides(tmp_path, **{"pretrain.steps": 100000, "pretrain.ckpt_every": 5})]
    proc = subprocess.Popen(cmd, env=subprocess_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    latest = tmp_path / "pretrain" / "checkpoints" / "latest"
    deadline = time.time() + 120
    while not latest.exists() and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted at step" in err and "checkpoint saved" in err
    step = int(latest.read_text().removeprefix("step"))
    assert step >= 5 and not (tmp_path / "pretrain" / "final").exists()
    # The same command (with a reachable step count) continues from that checkpoint.
    cmd[cmd.index("pretrain.steps=100000")] = f"pretrain.steps={step + 3}"
    proc = subprocess.run(cmd, env=subprocess_env(), cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"resumed from {latest.parent / f'step{step:08d}'} (step {step})" in proc.stdout
    assert read_meta(tmp_path / "pretrain" / "final")["step"] == step + 3
