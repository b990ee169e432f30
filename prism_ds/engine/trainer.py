"""The training loop: DeepSpeed engine, the PRISM/MDM loss, TensorBoard, checkpoints, exact resume.

Every stage shares it: "pretrain" trains the MDM alone, "finetune" attaches the quality head and
trains with the PRISM objective (backbone trainable or frozen), and "critic" trains the Token-Critic
baseline's separate critic DiT against the frozen f_theta of the finetune export. A stage's directory holds
    tb/            TensorBoard logs (rank 0) and config.yaml, the resolved run config
    checkpoints/   DeepSpeed checkpoints for exact resume (engine/resume.py)
    final/         the export of the trained weights (engine/checkpoint.py), what eval/sample read
"""
from __future__ import annotations

import math
import shutil
import signal
from pathlib import Path

import torch
import yaml
from tqdm import tqdm

from prism_ds.config import ConfigError, RunConfig, save_config, to_dict
from prism_ds.core.objective import compute_losses
from prism_ds.engine import distributed as dist_utils
from prism_ds.engine.checkpoint import export_trainable
from prism_ds.engine.cpu_kernels import use_cpu_kernels
from prism_ds.engine.data_source import Batch, Task, build_task, mask_seed
from prism_ds.engine.ema import EMA
from prism_ds.engine.monitor import Monitor
from prism_ds.engine.optim import build_optimizer, build_scheduler
from prism_ds.engine.resume import config_diff, latest_tag, load_training_state, save_training_state, signature
from prism_ds.models.critic import build_critic
from prism_ds.models.loading import build_pretrained_model, load_model
from prism_ds.models.mdlm import load_into
from prism_ds.models.prism_model import PrismModel, build_model, dit_dims
from prism_ds.models.weights import backbone_file, content_hash, load_backbone, read_meta

STAGES = {"pretrain": "pretrain", "finetune": "prism", "critic": "critic"}  # stage name -> loss mode


def stage_dir(cfg: RunConfig, stage: str) -> Path:
    """Where a stage writes its TensorBoard logs, checkpoints and export."""
    return Path(cfg.run_dir) / stage


def _check_stage(cfg: RunConfig, stage: str) -> None:
    s = getattr(cfg, stage)
    if stage == "pretrain" and s.init_from:
        raise ConfigError("pretrain.init_from is not supported: pretraining starts from scratch "
                          "(fine-tuning reads finetune.init_from)")
    if stage == "pretrain" and s.freeze_backbone:
        raise ConfigError("pretrain.freeze_backbone=true leaves nothing to train")
    if stage == "critic":
        _check_critic(cfg)
    if cfg.model.kind not in ("dit", "mdlm", "llada", "hf"):
        raise ConfigError(f"model.kind={cfg.model.kind!r}: expected dit, mdlm, llada or hf")
    if cfg.model.kind in ("llada", "hf") and cfg.task != "text":
        raise ConfigError(f"model.kind={cfg.model.kind} trains on task=text (prompt/solution pairs)")
    if cfg.model.kind == "mdlm" and cfg.task != "packed_text":
        raise ConfigError("model.kind=mdlm trains on task=packed_text (documents, as MDLM was pretrained)")
    if cfg.lora.r > 0 and cfg.model.kind in ("dit", "mdlm"):
        raise ConfigError("lora.r > 0 needs a pretrained Hugging Face backbone (model.kind=llada or hf)")
    for key in ("steps", "micro_batch_size", "grad_accum", "log_every", "ckpt_every", "calib_every", "keep_last"):
        if getattr(s, key) < 1:
            raise ConfigError(f"{stage}.{key}={getattr(s, key)} must be >= 1")


def _f_theta_export(cfg: RunConfig) -> Path:
    """The export whose backbone is the critic's frozen f_theta: critic.init_from, else this run's fine-tuning."""
    return Path(cfg.critic.init_from or stage_dir(cfg, "finetune") / "final")


def _check_critic(cfg: RunConfig) -> None:
    """The critic stage's own refusals, before anything is built."""
    if cfg.critic.steps < 1:
        raise ConfigError(f"critic.steps={cfg.critic.steps}: this run has no critic stage; set critic.steps (the "
                          f"authors' Sudoku critic trains 20000 steps)")
    if cfg.model.kind not in ("dit", "mdlm"):
        raise ConfigError(f"the critic stage trains a DiT critic of model.*'s sizes; model.kind={cfg.model.kind} "
                          f"is not a DiT")
    if cfg.critic.freeze_backbone:
        raise ConfigError("critic.freeze_backbone=true: the critic trains its whole DiT (f_theta is always frozen)")
    if not (_f_theta_export(cfg) / "meta.json").exists():
        raise ConfigError(f"the critic stage scores draws of the frozen f_theta in {_f_theta_export(cfg)}, which is "
                          f"not an export: train it first (`prism-ds train --stage finetune`) or set critic.init_from")


def _load_f_theta(cfg: RunConfig, task: Task, device: torch.device) -> PrismModel:
    """The frozen f_theta (the finetune export's backbone, its quality head left out), in eval mode."""
    export = _f_theta_export(cfg)
    if read_meta(export)["vocab_size"] != task.vocab_size:
        raise ConfigError(f"critic: f_theta in {export} has {read_meta(export)['vocab_size']} token ids but this "
                          f"run's data has {task.vocab_size}")
    model, _ = load_model(export, device)
    return PrismModel(model.backbone).eval().requires_grad_(False)


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


def _any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when `flag` is true on any rank (so all ranks take the same branch)."""
    value = torch.tensor([float(flag)], device=device)
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
    return bool(value.item())


def _rank0_choice(value):
    """Rank 0's `value` on every rank (e.g. which checkpoint to resume)."""
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        box = [value]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]
    return value


def _not_finite(stage: str, what: str, step: int, ckpt_dir: Path) -> FloatingPointError:
    last = latest_tag(ckpt_dir)
    return FloatingPointError(f"{stage}: {what} is not finite at step {step}; " + (
        f"latest stays at the last good checkpoint {ckpt_dir / last}" if last else "no checkpoint was saved yet"))


def _build(cfg: RunConfig, stage: str, task: Task, ds_config: dict) -> torch.nn.Module:
    """The model, built under zero.Init for ZeRO-3 so no rank ever materialises all of it."""
    import deepspeed

    s = getattr(cfg, stage)
    torch.manual_seed(cfg.seed)  # same initial weights on every rank
    if cfg.model.kind in ("llada", "hf"):  # a pretrained folder, or (fine-tuning) this run's pretraining export over it
        init = _hf_init(cfg) if stage == "finetune" else None
        return build_pretrained_model(cfg, stage == "finetune", not s.freeze_backbone, ds_config, init)
    zero3 = ds_config.get("zero_optimization", {}).get("stage", 0) >= 3
    dims = dit_dims(cfg.model)  # outside zero.Init: reading an MDLM checkpoint builds a model on the meta device
    with deepspeed.zero.Init(config_dict_or_path=ds_config, enabled=zero3):
        if stage == "critic":
            model = build_critic(cfg.model, task.vocab_size, task.mask_id, dims=dims)
        else:
            model = build_model(cfg.model, cfg.quality_head, task.vocab_size, with_head=stage == "finetune",
                                mask_id=task.mask_id, dims=dims)
    if stage == "critic":  # from scratch, as the authors' critic ("adapter"); f_theta is loaded apart, frozen
        return model
    init = _dit_init(cfg, stage)
    if init is not None:
        load_backbone(model, init)
    elif cfg.model.kind == "mdlm":  # the released MDLM weights
        load_into(model.backbone, cfg.model.path, cfg.model.use_ema)
    model.backbone.requires_grad_(not s.freeze_backbone)
    return model


def _dit_init(cfg: RunConfig, stage: str) -> Path | None:
    """The export a DiT stage starts from: fine-tuning reads finetune.init_from or this run's pretraining
    (required for kind=dit; for kind=mdlm only when it exists, else the MDLM checkpoint itself)."""
    if stage != "finetune":
        return None
    init = Path(cfg.finetune.init_from or stage_dir(cfg, "pretrain") / "final")
    if cfg.model.kind == "mdlm" and not cfg.finetune.init_from and not (init / "meta.json").exists():
        return None
    return init


@torch.no_grad()
def _heldout(model, batch: Batch, cfg: RunConfig, task: Task, chunk: int, mode: str, f_theta=None
             ) -> tuple[float, torch.Tensor | None, torch.Tensor | None]:
    """(MDM loss, quality logits, labels) on the held-out set, in micro-batch chunks, with the same z and y every
    time; quality and labels only in PRISM and critic mode (critic: f_theta's MDM loss, the critic's logits on x̂)."""
    model.eval()
    gen = torch.Generator(device=batch.x.device).manual_seed(cfg.seed + 99991)
    quality, label, mdm = [], [], 0.0
    for i in range(0, len(batch.x), chunk):
        out = compute_losses(model, batch.x[i:i + chunk], batch.fixed[i:i + chunk], task.mask_id, mode,
                             cfg.masking, cfg.prism, lengths=batch.lengths[i:i + chunk], generator=gen,
                             allowed_tokens=task.allowed_tokens, f_theta=f_theta)
        mdm += out.mdm.item() * len(batch.x[i:i + chunk])
        quality.append(out.quality)
        label.append(out.label)
    model.train()
    if mode == "pretrain":
        return mdm / len(batch.x), None, None
    return mdm / len(batch.x), torch.cat(quality), torch.cat(label)


def finished_export(cfg: RunConfig, stage: str, overwrite: bool = False) -> Path | None:
    """The stage's final export when it was trained with this config (None: train it).

    A finished stage with a config that would train differently is an error listing the differing keys;
    `overwrite` (or `<stage>.resume=false`) starts over instead.
    """
    final = stage_dir(cfg, stage) / "final"
    if overwrite or not getattr(cfg, stage).resume or not (final / "meta.json").exists():
        return None
    saved = yaml.safe_load((final / "config.yaml").read_text())
    diff = config_diff(saved, to_dict(cfg), stage)
    if read_meta(final).get("init") not in (None, init_fingerprint(cfg, stage)):
        source = (cfg.critic.init_from or "finetune/final") if stage == "critic" else \
            (cfg.finetune.init_from or "pretrain/final")
        diff.append(f"the weights it started from ({source}) have changed")
    if diff:
        raise ConfigError(f"{final} was trained with a different config ({'; '.join(diff)}). Pass --overwrite "
                          f"(or {stage}.resume=false) to train it again, or use another run_dir")
    return final


def _hf_init(cfg: RunConfig) -> Path | None:
    """A Hugging Face backbone's fine-tuning start: finetune.init_from, else this run's pretraining export when
    it trained the backbone, else None (model.path's own weights)."""
    init = Path(cfg.finetune.init_from or stage_dir(cfg, "pretrain") / "final")
    if (init / "backbone.safetensors").exists():
        return init
    if cfg.finetune.init_from:
        raise ConfigError(f"finetune.init_from={cfg.finetune.init_from!r}: no backbone.safetensors there (a "
                          f"pretraining export of this model.path is expected)")
    return None


def init_fingerprint(cfg: RunConfig, stage: str) -> str | None:
    """What a fine-tuning stage starts from: the backbone's content hash (a DiT export, or this run's
    pretraining of a Hugging Face backbone), else the pretrained folder's shard names, sizes and times
    (hashing 16 GB would take minutes). The critic: its frozen f_theta's backbone. None for pretraining."""
    if stage == "critic":
        return content_hash([backbone_file(_f_theta_export(cfg))])
    if stage != "finetune":
        return None
    if cfg.model.kind == "mdlm" and _dit_init(cfg, stage) is None:
        p = Path(cfg.model.path)
        files = [p] if p.is_file() else sorted(f for f in p.iterdir() if f.suffix in (".safetensors", ".bin"))
        return content_hash([], str([(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]))
    if cfg.model.kind in ("llada", "hf"):
        init = _hf_init(cfg)
        if init is not None:
            return content_hash([init / "backbone.safetensors"])
        shards = sorted(Path(cfg.model.path).glob("*.safetensors"))
        return content_hash([], str([(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in shards]))
    init = Path(cfg.finetune.init_from or stage_dir(cfg, "pretrain") / "final")
    return content_hash([backbone_file(init)]) if (init / "meta.json").exists() else None


def _start_over(stage_path: Path, rank: int) -> None:
    """Remove the stage's old checkpoints and export, so a fresh run never mixes with (or prunes into) them
    and an interrupted fresh run is never mistaken for the old finished one."""
    if rank == 0:
        for old in (stage_path / "checkpoints", stage_path / "final"):
            if old.exists():
                print(f"[prism-ds] starting over: removing {old}")
                shutil.rmtree(old)
    dist_utils.barrier()


def train(cfg: RunConfig, stage: str, progress: bool = True, overwrite: bool = False) -> Path:
    """Run one stage and return its final export.

    A finished stage trained with the same config is returned as is; an interrupted one resumes from its
    latest checkpoint. `overwrite` (or `<stage>.resume=false`) starts the stage over.
    """
    import deepspeed

    if stage not in STAGES:
        raise ConfigError(f"stage '{stage}' is unknown; expected one of {sorted(STAGES)}")
    s, mode = getattr(cfg, stage), STAGES[stage]
    _check_stage(cfg, stage)
    use_cpu_kernels(cfg.cpu_kernels)  # a no-op under `prism-ds`, which applied it first; else it says why not
    done = finished_export(cfg, stage, overwrite)
    if done is not None:
        if dist_utils.rank() == 0:
            print(f"[prism-ds] {stage}: already finished with this config ({done}); nothing to do")
        return done
    dist_utils.init_distributed()
    rank, n_ranks, device = dist_utils.rank(), dist_utils.world_size(), dist_utils.device()
    out_dir, ckpt_dir = stage_dir(cfg, stage), stage_dir(cfg, stage) / "checkpoints"
    ds_config = dist_utils.build_ds_config(s, stage, n_ranks, cfg.model.dtype)
    if s.ema_decay and ds_config.get("zero_optimization", {}).get("stage", 0) >= 3:
        # Checked before the data is built: the refusal should not wait for it.
        raise ConfigError(f"{stage}.ema_decay={s.ema_decay} needs ZeRO stage <= 2, but {stage}.ds_config="
                          f"{s.ds_config} uses stage 3 (a full EMA copy per rank would defeat partitioning); set "
                          f"{stage}.ema_decay=0 or use a stage-2 config such as zero2.json")
    task = build_task(cfg, s.micro_batch_size, rank, n_ranks, progress)
    if mode == "prism" and cfg.prism.k > task.maskable:
        raise ConfigError(f"prism.k={cfg.prism.k} exceeds the {task.maskable} maskable positions of a sequence")
    if overwrite or not s.resume:  # only now: a run refused above keeps the checkpoints it found
        _start_over(out_dir, rank)
    model = _build(cfg, stage, task, ds_config)
    f_theta = _load_f_theta(cfg, task, device) if mode == "critic" else None
    optimizer = build_optimizer(model, s, ds_config)
    scheduler = build_scheduler(optimizer, s, stage)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
    ema = EMA(engine.module, s.ema_decay) if s.ema_decay else None
    mask_gen = torch.Generator(device=device).manual_seed(mask_seed(cfg, rank))  # masking and y draws
    run_sig = signature(cfg, stage, task.vocab_size, n_ranks)
    frozen = any(not p.requires_grad for p in engine.module.parameters())

    start, state = 0, None
    resume_tag = _rank0_choice(latest_tag(ckpt_dir))  # one decision for all ranks
    if resume_tag is not None:
        start, state = load_training_state(engine, ckpt_dir, resume_tag, run_sig, strict=not frozen)
        task.source.load_state_dict(state["source"])
        mask_gen.set_state(state["mask_generator"])
        torch.set_rng_state(state["torch_rng"])
        if state.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda_rng"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        if rank == 0:
            print(f"[prism-ds] {stage}: resumed from {ckpt_dir / resume_tag} (step {start})")
    if rank == 0:
        save_config(cfg, out_dir / "config.yaml")
        save_config(cfg, out_dir / "tb" / "config.yaml")
    n_params = sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters())
    n_trainable = sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters() if p.requires_grad)
    monitor = Monitor(out_dir / "tb" if rank == 0 else None, s.log_every, n_ranks, n_params, s.peak_tflops,
                      str(to_dict(cfg)), purge_step=start + 1 if start else None, n_trainable=n_trainable,
                      backbone_trains=any(p.requires_grad for p in engine.module.backbone.parameters()),
                      term="critic" if mode == "critic" else "prism")
    if state is not None:
        monitor.load_state_dict(state["monitor"])
    # Held-out sequences: validation MDM loss in both stages, and the head's calibration when fine-tuning.
    heldout = task.heldout.to(device) if task.heldout is not None else None
    meta = {"stage": stage, "vocab_size": task.vocab_size, "mask_id": task.mask_id, "params": n_params,
            "trainable": n_trainable, "init": init_fingerprint(cfg, stage)}
    if cfg.model.kind in ("dit", "mdlm"):  # an export rebuilds without the MDLM checkpoint it started from
        meta["dit"] = {k: v for k, v in dit_dims(cfg.model).items() if k != "vocab_size"}
    if mode == "critic":
        meta["f_theta"] = str(_f_theta_export(cfg).resolve())

    def checkpoint(step: int) -> None:
        rank_state = {"source": task.source.state_dict(), "mask_generator": mask_gen.get_state(),
                      "torch_rng": torch.get_rng_state(), "ema": ema.state_dict() if ema is not None else None,
                      "cuda_rng": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
                      "monitor": monitor.state_dict()}  # a logging window that spans the restart
        save_training_state(engine, ckpt_dir, step, rank_state, run_sig, s.keep_last, exclude_frozen=frozen)

    bar = tqdm(range(start + 1, s.steps + 1), desc=f"{stage} ({mode})", disable=not (progress and rank == 0),
               initial=start, total=s.steps)
    step = start
    with _Interrupt() as interrupt:
        for step in bar:
            for _ in range(s.grad_accum):
                batch = task.source.next_batch().to(device)
                losses = compute_losses(engine, batch.x, batch.fixed, task.mask_id, mode, cfg.masking, cfg.prism,
                                        lengths=batch.lengths, generator=mask_gen, allowed_tokens=task.allowed_tokens,
                                        f_theta=f_theta)
                # Every rank stops together: a rank raising alone would leave the others waiting in a collective.
                if _any_rank(not torch.isfinite(losses.total).item(), device):
                    raise _not_finite(stage, f"the loss ({losses.total.item()} on rank {rank})", step, ckpt_dir)
                engine.backward(losses.total)
                engine.step()
                monitor.record(losses, len(batch.x), batch.pad_tokens, batch.x.numel())
            grad_norm = engine.get_global_grad_norm()  # global: the same on every rank
            if grad_norm is not None and not math.isfinite(float(grad_norm)) and not engine.fp16_enabled():
                raise _not_finite(stage, f"the gradient norm ({float(grad_norm)})", step, ckpt_dir)
            if ema is not None:
                ema.update(engine.module)
            if monitor.due(step, s.steps):
                lrs = {g.get("name", str(i)): lr for i, (g, lr) in
                       enumerate(zip(optimizer.param_groups, scheduler.get_last_lr()))}
                logged = monitor.log(step, lrs, grad_norm, task.source.counters())
                bar.set_postfix({k.split("/")[-1]: f"{v:.3g}" for k, v in logged.items()
                                 if k.startswith(("loss", "quality/auroc"))})
            if heldout is not None and (step % s.calib_every == 0 or step == s.steps):
                val, quality, label = _heldout(engine.module, heldout, cfg, task, s.micro_batch_size, mode, f_theta)
                monitor.log_validation(step, val)
                if quality is not None:
                    monitor.log_calibration(step, quality, label)
            stop = _any_rank(interrupt.requested, device)  # all ranks save and stop together
            if step % s.ckpt_every == 0 or step == s.steps or stop:
                checkpoint(step)
            if stop:
                monitor.close()
                raise KeyboardInterrupt(f"{stage} interrupted at step {step}; checkpoint saved to {ckpt_dir}; "
                                        f"run the same command again to resume")
    if cfg.model.kind in ("dit", "mdlm"):  # a frozen backbone stays where it came from (an export or MDLM's file)
        base = (_dit_init(cfg, stage) or cfg.model.path) if s.freeze_backbone else None
    else:  # a pretrained folder is the base; only adapters (or a fully trained backbone) are written
        base = cfg.model.path
        init = _hf_init(cfg) if stage == "finetune" else None
        if init is not None and (s.freeze_backbone or cfg.lora.r > 0):  # untouched weights of our pretraining
            meta["init_backbone"] = str(init.resolve())
    final = export_trainable(ema.module if ema is not None else engine.module, cfg, out_dir / "final",
                             {**meta, "step": step}, rank == 0, base_backbone=base,
                             backbone_trained=not s.freeze_backbone and cfg.lora.r == 0)
    monitor.close()
    return final
