"""The training loop: DeepSpeed engine, the PRISM/MDM loss, TensorBoard, checkpoints.

Both stages share it: "pretrain" trains the MDM alone, "finetune" attaches the quality head and
trains with the PRISM objective (backbone trainable or frozen).
"""
from __future__ import annotations

import signal
from pathlib import Path

import torch
from tqdm import tqdm

from prism_ds.config import ConfigError, RunConfig, save_config, to_dict
from prism_ds.core.objective import compute_losses
from prism_ds.engine import distributed as dist_utils
from prism_ds.engine.checkpoint import load_backbone, save_checkpoint
from prism_ds.engine.ema import EMA
from prism_ds.engine.monitor import Monitor
from prism_ds.models.prism_model import build_model

STAGES = {"pretrain": "pretrain", "finetune": "prism"}  # stage name -> loss mode


def stage_dir(cfg: RunConfig, stage: str) -> Path:
    """Where a stage writes its TensorBoard logs and checkpoints."""
    return Path(cfg.run_dir) / stage


def _check_stage(cfg: RunConfig, stage: str, train_len: int, maskable: int) -> None:
    s = getattr(cfg, stage)
    if stage == "finetune" and cfg.prism.k > maskable:
        raise ConfigError(f"prism.k={cfg.prism.k} exceeds the {maskable} maskable positions of a sequence")
    if stage == "pretrain" and s.init_from:
        raise ConfigError("pretrain.init_from is not supported: pretraining starts from scratch "
                          "(fine-tuning reads finetune.init_from)")
    if s.steps < 1 or s.micro_batch_size < 1 or s.grad_accum < 1:
        raise ConfigError(f"{stage}.steps, .micro_batch_size and .grad_accum must be >= 1")
    if train_len < 1:
        raise ConfigError("training data is empty")


class _Interrupt:
    """Turn SIGINT/SIGTERM into a flag so the loop stops between steps and saves a checkpoint."""

    def __init__(self):
        self.requested = False

    def __enter__(self):
        self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def _handle(self, signum, frame):
        if self.requested:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


def train(cfg: RunConfig, stage: str, data: torch.Tensor, fixed: torch.Tensor, mask_id: int, vocab_size: int,
          progress: bool = True) -> Path:
    """Run one stage on `data` [N, L] (fixed [L] bool marks never-masked positions); returns the final checkpoint."""
    import deepspeed

    if stage not in STAGES:
        raise ConfigError(f"stage '{stage}' is unknown; expected one of {sorted(STAGES)}")
    s, mode = getattr(cfg, stage), STAGES[stage]
    _check_stage(cfg, stage, len(data), int((~fixed).sum()))
    dist_utils.init_distributed()
    rank, n_ranks, device = dist_utils.rank(), dist_utils.world_size(), dist_utils.device()
    out_dir = stage_dir(cfg, stage)
    torch.manual_seed(cfg.seed)  # same initial weights on every rank

    model = build_model(cfg.model, cfg.quality_head, vocab_size, with_head=mode == "prism")
    if stage == "finetune":
        init_from = s.init_from or str(stage_dir(cfg, "pretrain") / "final")
        load_backbone(model, init_from)
        model.backbone.requires_grad_(not s.freeze_backbone)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=s.lr, weight_decay=s.weight_decay, betas=tuple(s.betas))
    from transformers import get_scheduler

    scheduler = get_scheduler(s.lr_schedule, optimizer, num_warmup_steps=s.warmup_steps, num_training_steps=s.steps)
    ds_config = dist_utils.build_ds_config(s, stage, n_ranks)
    if s.ema_decay and ds_config.get("zero_optimization", {}).get("stage", 0) >= 3:
        raise ConfigError(f"{stage}.ema_decay needs ZeRO stage <= 2 ({s.ds_config} uses stage 3; "
                          f"a full EMA copy per rank would defeat partitioning)")
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
    ema = EMA(engine.module, s.ema_decay) if s.ema_decay else None

    if rank == 0:
        save_config(cfg, out_dir / "config.yaml")
    monitor = Monitor(out_dir / "tb" if rank == 0 else None, s.log_every, n_ranks, str(to_dict(cfg)))
    gen = torch.Generator(device=device).manual_seed(cfg.seed * 1000 + rank + 1)  # distinct data per rank
    fixed_batch = fixed.to(device)[None].expand(s.micro_batch_size, -1)
    data = data.to(device)
    meta = {"stage": stage, "params": sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters()),
            "trainable": sum(p.numel() for p in trainable)}
    save_model = ema.module if ema is not None else engine.module

    bar = tqdm(range(1, s.steps + 1), desc=f"{stage} ({mode})", disable=not (progress and rank == 0))
    step = 0
    with _Interrupt() as interrupt:
        for step in bar:
            for _ in range(s.grad_accum):
                idx = torch.randint(0, len(data), (s.micro_batch_size,), generator=gen, device=device)
                losses = compute_losses(engine, data[idx], fixed_batch, mask_id, mode, cfg.masking, cfg.prism,
                                        generator=gen)
                if not torch.isfinite(losses.total):
                    last = out_dir / "last"
                    raise FloatingPointError(f"{stage}: loss is {losses.total.item()} at step {step}; " + (
                        f"last good checkpoint: {last}" if last.exists() else "no checkpoint was saved yet"))
                engine.backward(losses.total)
                engine.step()
                monitor.record(losses)
            if ema is not None:
                ema.update(engine.module)
            logged = monitor.maybe_log(step, s.steps, scheduler.get_last_lr()[0], engine.get_global_grad_norm())
            if logged:
                bar.set_postfix({k.split("/")[-1]: f"{v:.3g}" for k, v in logged.items()
                                 if k.startswith(("loss", "quality/auroc"))})
            if step % s.ckpt_every == 0 or interrupt.requested:
                save_checkpoint(save_model, cfg, out_dir / "last", {**meta, "step": step}, rank == 0)
            if interrupt.requested:
                monitor.close()
                raise KeyboardInterrupt(f"{stage} interrupted at step {step}; checkpoint saved to {out_dir / 'last'}")
    final = save_checkpoint(save_model, cfg, out_dir / "final", {**meta, "step": step}, rank == 0)
    monitor.close()
    return final
