"""DeepSpeed training checkpoints for exact resume: model, optimizer, schedule, data position, RNG.

Layout under <run_dir>/<stage>/checkpoints/:
    step00000200/          DeepSpeed's files (ZeRO partitions, optimizer and scheduler state)
        rank0_state.pt     this rank's data position, RNG states and EMA (one file per rank)
        run.json           stage, vocabulary, world size and the resolved config, checked on resume
    latest                 the newest *complete* tag
`latest` is written by rank 0 only after every rank has finished writing (a barrier), through a
temporary file and an atomic rename, so a crash during a save leaves it at the previous checkpoint.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from prism_ds.config import ConfigError, RunConfig, to_dict


def tag_for(step: int) -> str:
    """Checkpoint tag of a step (zero-padded so tags sort by step)."""
    return f"step{step:08d}"


def latest_tag(ckpt_dir: Path) -> str | None:
    """The tag `latest` points to, or None when no checkpoint was completed."""
    latest = Path(ckpt_dir) / "latest"
    return latest.read_text().strip() if latest.exists() else None


def signature(cfg: RunConfig, stage: str, vocab_size: int, world_size: int) -> dict:
    """What must match between a checkpoint and the run resuming from it."""
    return {"stage": stage, "vocab_size": vocab_size, "world_size": world_size, "config": to_dict(cfg)}


# Keys that do not change what a stage trains: reusing or resuming across a change to them is fine.
# cpu_kernels changes rounding, not what is trained (as the thread count): a run may resume under the other mode.
# model.dtype is not one: it sets the engine's precision (distributed.build_ds_config), e.g. bf16 or fp32 on CPU.
_BOOKKEEPING = {"run_dir", "cpu_kernels", "sampler", "codeeval", "text_eval", "data.eval_csv", "data.n_eval",
                "data.blanks", "text.heldout_source", "model.attention", "model.gradient_checkpointing"}
_STAGE_BOOKKEEPING = ("log_every", "calib_every", "ckpt_every", "keep_last", "resume", "peak_tflops")


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        out |= _flatten(value, dotted + ".") if isinstance(value, dict) else {dotted: value}
    return out


def _with_defaults(saved: dict, defaults: dict) -> dict:
    """A config saved by an older prism-ds, with the keys added since at their default values."""
    out = {}
    for key, default in defaults.items():
        value = saved.get(key, default)
        out[key] = _with_defaults(value, default) if isinstance(default, dict) and isinstance(value, dict) else value
    return out


def config_diff(saved: dict, current: dict, stage: str, ignore: tuple[str, ...] = ()) -> list[str]:
    """Dotted keys (with both values) where two resolved configs would train `stage` differently."""
    saved = _with_defaults(saved, to_dict(RunConfig()))
    # Other stages' settings never count: what a stage starts from is checked by its init fingerprint instead.
    others = {"pretrain", "finetune", "critic"} - {stage}
    skip = set(_BOOKKEEPING) | others | {f"{stage}.{k}" for k in _STAGE_BOOKKEEPING + ignore}
    if stage == "pretrain":  # the quality head and PRISM objective only exist in fine-tuning
        skip |= {"prism", "quality_head"}
    a, b = _flatten(saved), _flatten(current)
    keep = lambda k: not any(k == s or k.startswith(s + ".") for s in skip)  # noqa: E731
    return [f"{k}: {a.get(k, '<unset>')!r} -> {b.get(k, '<unset>')!r}"
            for k in sorted(set(a) | set(b)) if keep(k) and a.get(k) != b.get(k)]


def _check_signature(saved: dict, current: dict, where: Path) -> None:
    diffs = []
    for key in ("stage", "vocab_size", "world_size"):
        if saved[key] != current[key]:
            diffs.append(f"{key}: checkpoint {saved[key]} vs run {current[key]}")
    # The step count may change on resume (extend or shorten a run); nothing else that shapes training may.
    diffs += config_diff(saved["config"], current["config"], current["stage"], ignore=("steps",))
    if diffs:
        raise ConfigError(f"{where}: cannot resume, this checkpoint belongs to a different run ("
                          + "; ".join(diffs) + "). Use a new run_dir, or start over with resume=false or --overwrite")


def save_training_state(engine, ckpt_dir: Path, step: int, rank_state: dict, run_signature: dict,
                        keep_last: int, exclude_frozen: bool) -> str:
    """Write a DeepSpeed checkpoint for `step` on every rank, then point `latest` at it; returns the tag."""
    rank = torch.distributed.get_rank()
    tag = tag_for(step)
    tag_dir = Path(ckpt_dir) / tag
    tag_dir.mkdir(parents=True, exist_ok=True)
    torch.save(rank_state, tag_dir / f"rank{rank}_state.pt")
    if rank == 0:
        (tag_dir / "run.json").write_text(json.dumps({**run_signature, "step": step}, indent=2))
    # DeepSpeed ends its save with a barrier, so after it every rank's files are complete.
    engine.save_checkpoint(str(ckpt_dir), tag=tag, save_latest=False, exclude_frozen_parameters=exclude_frozen)
    if rank == 0:
        tmp = Path(ckpt_dir) / "latest.tmp"
        tmp.write_text(tag)
        os.replace(tmp, Path(ckpt_dir) / "latest")
        _prune(Path(ckpt_dir), keep_last, keep=tag)
    torch.distributed.barrier()
    return tag


def _prune(ckpt_dir: Path, keep_last: int, keep: str) -> None:
    tags = sorted(p.name for p in ckpt_dir.glob("step*") if p.is_dir())
    for name in tags[:-max(keep_last, 1)]:
        if name != keep:
            shutil.rmtree(ckpt_dir / name, ignore_errors=True)


def load_training_state(engine, ckpt_dir: Path, tag: str, run_signature: dict, strict: bool) -> tuple[int, dict]:
    """Restore checkpoint `tag` into `engine`; returns (step, this rank's saved state)."""
    tag_dir = Path(ckpt_dir) / tag
    if not tag_dir.is_dir():  # rank 0 chose the tag: this rank must see the same run_dir
        raise FileNotFoundError(f"{tag_dir} missing on rank {torch.distributed.get_rank()}: run_dir must be on a "
                                f"filesystem every node shares")
    run_file = tag_dir / "run.json"
    if not run_file.exists():
        raise FileNotFoundError(f"{run_file} missing: {ckpt_dir}/latest points at an incomplete checkpoint")
    saved = json.loads(run_file.read_text())
    _check_signature(saved, run_signature, run_file)
    path, _ = engine.load_checkpoint(str(ckpt_dir), tag=tag, load_module_strict=strict,
                                     load_optimizer_states=True, load_lr_scheduler_states=True)
    if path is None:
        raise FileNotFoundError(f"{tag_dir}: DeepSpeed could not load this checkpoint")
    rank = torch.distributed.get_rank()
    # To the CPU: a GPU rank's file holds its EMA shadow on cuda:<local rank>, which would otherwise be rebuilt
    # there (a second full copy on the GPU) or fail on a host without that GPU; load_state_dict copies it over.
    state = torch.load(tag_dir / f"rank{rank}_state.pt", map_location="cpu", weights_only=False)
    return int(saved["step"]), state
