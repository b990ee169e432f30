"""`prism-ds code-eval generate`: sample solutions with the blockwise sampler into an evalplus-style JSONL.

Each line is one (task, sample): {"task_id", "solution", "raw", "sample", "settings"}; "solution" is the
extracted program (HumanEval answers that only continue the signature get it prepended), "raw" the
decoded answer. Lines are appended after every batch, so an interrupted run loses nothing and a rerun
skips what is done; a file written with other settings is refused. The (task, sample) rows are cut into
fixed batches of codeeval.batch_size, each with its own seed, so samples do not depend on the number of
ranks or on interruptions. Launched on several ranks (deepspeed/torchrun), rank r takes every r-th batch
into `<out>.rank<r>.jsonl` and rank 0 merges.
"""
from __future__ import annotations

import json
import warnings
import zlib
from dataclasses import replace
from pathlib import Path
from typing import NamedTuple

import torch
from tqdm import tqdm

from prism_ds.codeeval.extract import complete_program, extract_code
from prism_ds.codeeval.tasks import CodeTask, check_benchmark, load_tasks, select, task_prompt_ids
from prism_ds.config import RunConfig, to_dict
from prism_ds.core.remask import parse_variant
from prism_ds.core.sampler import SamplerSettings, check_fast_sampling, sample
from prism_ds.core.schedules.pacing import k_block_needs_inner_step
from prism_ds.core.schedules import blockwise_schedule
from prism_ds.engine import distributed as dist_utils
from prism_ds.jsonl import jsonl_rows
from prism_ds.models.loading import load_model, mask_token_id, vocab_size
from prism_ds.text.tokenizer import load_tokenizer

SETTING_KEYS = ("canvas", "gen_length", "block_length", "steps", "k_block", "policies", "unmask_order", "temperature",
                "top_p", "cfg_scale", "forbid_eos", "eos_confidence", "stop_at_eos", "seed", "cache", "threshold",
                "threshold_steps")


class PromptBatch(NamedTuple):
    """A batch's canvas: tokens and fixed positions [B, L], the padding mask (None without padding) and where each
    row's answer starts [B]."""

    tokens: torch.Tensor
    fixed: torch.Tensor
    attention_mask: torch.Tensor | None
    starts: torch.Tensor


def settings_of(cfg: RunConfig, model_dir: str, benchmark: str) -> dict:
    """What a samples file was made with (recorded on every line, compared on resume and scoring)."""
    s = to_dict(cfg.sampler)
    out = {k: s[k] for k in SETTING_KEYS}
    out["steps"], out["policy"] = out["steps"][0], out.pop("policies")[0]
    if out["canvas"]:  # gen_length plays no part in the canvas layout
        out["gen_length"] = None
    return {"benchmark": benchmark, "prompt_format": cfg.text.prompt_format, "model": str(Path(model_dir).resolve()),
            "n_samples": cfg.codeeval.n_samples, "tasks": cfg.codeeval.tasks,
            "merge_adapter": cfg.codeeval.merge_adapter, "batch_size": cfg.codeeval.batch_size, "remask_count": cfg.sampler.remask_count, **out}


def read_samples(path: Path, settings: dict | None = None) -> list[dict]:
    """Lines of a samples file; errors name the file and line (malformed JSON, or other settings)."""
    rows = []
    if not path.exists():
        return rows
    for n, row in jsonl_rows(path):
        if not isinstance(row, dict) or "task_id" not in row or not ({"solution", "completion"} & set(row)):
            raise ValueError(f"{path}, line {n}: expected an object with task_id and solution (or completion)")
        if settings is not None and row.get("settings") != settings:
            diff = sorted(k for k in settings if (row.get("settings") or {}).get(k) != settings[k])
            raise ValueError(f"{path}, line {n}: written with other settings ({', '.join(diff)} differ); use "
                             f"another --out or the same settings")
        rows.append(row)
    return rows


def _check(cfg: RunConfig) -> None:
    s = cfg.sampler
    if len(s.steps) != 1 or len(s.policies) != 1:
        raise ValueError(f"code-eval generate runs one setting: sampler.steps={s.steps} and sampler.policies="
                         f"{s.policies} must each have one value (the sweep command runs several)")
    policy, count = parse_variant(s.policies[0], s.remask_count)
    planned = k_block_needs_inner_step(policy, s.threshold or None, s.threshold_steps)
    blockwise_schedule(s, count).check(s.steps[0], planned_remasks=planned)
    check_fast_sampling(s.cache, s.threshold or None, s.threshold_steps)  # before the model loads
    if cfg.codeeval.n_samples < 1 or cfg.codeeval.batch_size < 1:
        raise ValueError("codeeval.n_samples and codeeval.batch_size must be >= 1")


def prompt_batch(tokenizer, tasks: list[CodeTask], cfg: RunConfig, mask_id: int, device) -> PromptBatch:
    """The sampler's canvas for a batch of tasks, in the layout sampler.canvas chooses.

    canvas > 0 (the PRISM authors'): each row is its prompt followed by masks up to `canvas` positions; no
    padding, so every row's blocks start right after its own prompt. canvas = 0 (LLaDA's generate.py): prompts
    left-padded to the longest, then gen_length masks; the padding is hidden from attention.
    """
    prompts = [task_prompt_ids(tokenizer, t, cfg.text) for t in tasks]
    canvas = cfg.sampler.canvas
    if canvas:
        for task, ids in zip(tasks, prompts):
            if len(ids) >= canvas:
                raise ValueError(f"task {task.task_id}: its prompt has {len(ids)} tokens, which leaves no room to "
                                 f"generate in sampler.canvas={canvas}")
        tokens = torch.full((len(tasks), canvas), mask_id, dtype=torch.long)
        fixed = torch.zeros_like(tokens, dtype=torch.bool)
        for i, ids in enumerate(prompts):
            tokens[i, :len(ids)], fixed[i, :len(ids)] = torch.tensor(ids), True
        starts = torch.tensor([len(ids) for ids in prompts])
        return PromptBatch(tokens.to(device), fixed.to(device), None, starts)
    width, gen = max(map(len, prompts)), cfg.sampler.gen_length
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    tokens = torch.full((len(tasks), width + gen), mask_id, dtype=torch.long)
    attention = torch.ones_like(tokens)
    for i, ids in enumerate(prompts):
        tokens[i, :width - len(ids)], attention[i, :width - len(ids)] = pad, 0
        tokens[i, width - len(ids):width] = torch.tensor(ids)
    fixed = torch.zeros_like(tokens, dtype=torch.bool)
    fixed[:, :width] = True  # the prompt (and its padding) is never changed
    return PromptBatch(tokens.to(device), fixed.to(device), None if attention.all() else attention.to(device),
                       torch.full((len(tasks),), width))


def _stop_ids(tokenizer) -> set[int]:
    """Ids that end an answer: EOS and, for LLaDA's chat format, <|eot_id|>."""
    return {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|eot_id|>")} - {None, tokenizer.unk_token_id}


def _decode(tokenizer, ids: list[int]) -> str:
    """The answer text up to the first end-of-turn / end-of-text token."""
    stops = _stop_ids(tokenizer)
    cut = next((i for i, t in enumerate(ids) if t in stops), len(ids))
    return tokenizer.decode(ids[:cut], skip_special_tokens=True)


def generate(benchmark: str, model_dir: str, cfg: RunConfig, out: str | Path, progress: bool = True) -> Path:
    """Write (or complete) `out` with n_samples solutions per task; returns the merged file (rank 0)."""
    check_benchmark(benchmark)
    _check(cfg)
    out = Path(out)
    settings = settings_of(cfg, model_dir, benchmark)
    tasks = select(load_tasks(benchmark, cfg.codeeval), cfg.codeeval.tasks)
    rank, world = dist_utils.rank(), dist_utils.world_size()
    part = out.with_name(f"{out.name}.rank{rank}.jsonl") if world > 1 else out
    done = {(str(r["task_id"]), r["sample"]) for f in {out, part} for r in read_samples(f, settings)}
    # Fixed batches over the whole run, rank r taking every r-th: a batch's rows and its seed do not depend
    # on the number of ranks or on where a previous run stopped, so samples are reproducible.
    rows = [(t, k) for t in tasks for k in range(cfg.codeeval.n_samples)]
    size = cfg.codeeval.batch_size
    batches = [(b, rows[b * size:(b + 1) * size]) for b in range(rank, -(-len(rows) // size), world)]
    batches = [(b, chunk) for b, chunk in batches if any((str(t.task_id), k) not in done for t, k in chunk)]
    if batches:
        model, model_cfg = load_model(model_dir, dist_utils.device(), merge_adapter=cfg.codeeval.merge_adapter)
        if (Path(model_dir) / "meta.json").exists() and model_cfg.task == "text" \
                and model_cfg.text.prompt_format != cfg.text.prompt_format:
            warnings.warn(f"{model_dir} was fine-tuned with text.prompt_format={model_cfg.text.prompt_format!r}; "
                          f"these prompts use {cfg.text.prompt_format!r} (set text.prompt_format to match)",
                          stacklevel=2)
        base = model_cfg.model.path
        tokenizer = load_tokenizer(replace(model_cfg.text, tokenizer=model_cfg.text.tokenizer or base))
        mask_id, vocab = mask_token_id(base, tokenizer), vocab_size(base)
        allowed = torch.arange(vocab) < len(tokenizer)
        if cfg.sampler.forbid_eos:  # LLaDA ends an answer with <|eot_id|>, then EOS pads: both are "EOS"
            allowed[[t for t in _stop_ids(tokenizer) if t < vocab]] = False
        s = cfg.sampler
        policy, count = parse_variant(s.policies[0], s.remask_count)
        out.parent.mkdir(parents=True, exist_ok=True)
        bar = tqdm(total=sum(map(len, (c for _, c in batches))), desc=f"generating {benchmark} ({policy})",
                   disable=not progress)
        for b, chunk in batches:
            device = tokens_device(model)
            batch = prompt_batch(tokenizer, [t for t, _ in chunk], cfg, mask_id, device)
            sampler_settings = SamplerSettings.from_config(
                s, mask_id, s.steps[0], blockwise_schedule(s, count), policy, allowed_tokens=allowed.to(device),
                threshold=s.threshold or None, threshold_steps=s.threshold_steps, cache=s.cache, cfg_scale=s.cfg_scale,
                eos_id=tokenizer.eos_token_id, eos_confidence=s.eos_confidence, stop_at_eos=s.stop_at_eos)
            gen = torch.Generator(device=device).manual_seed(zlib.crc32(f"{s.seed}:{b}".encode()))
            filled = sample(model, batch.tokens, batch.fixed, sampler_settings, attention_mask=batch.attention_mask,
                            cfg_mask=batch.fixed, generator=gen)
            with part.open("a", encoding="utf-8") as fh:
                for (task, k), ids, start in zip(chunk, filled.tolist(), batch.starts.tolist()):
                    if (str(task.task_id), k) in done:  # a batch cut short by an interruption is redone whole
                        continue
                    raw = _decode(tokenizer, ids[start:])
                    code = complete_program(extract_code(raw, task.entry_point), task.prompt_code, task.entry_point)
                    fh.write(json.dumps({"task_id": task.task_id, "solution": code, "raw": raw, "sample": k,
                                         "settings": settings}) + "\n")
            bar.update(len(chunk))
        bar.close()
    return _merge(out, tasks, settings, world, rank)


def tokens_device(model) -> torch.device:
    """Where the model's parameters live (inputs go there)."""
    return next(model.parameters()).device


def _merge(out: Path, tasks: list[CodeTask], settings: dict, world: int, rank: int) -> Path:
    """Rank 0 gathers every rank's lines into `out`, in task order, once all ranks are done."""
    if world == 1:
        return out
    dist_utils.barrier()
    if rank == 0:
        parts = [out.with_name(f"{out.name}.rank{r}.jsonl") for r in range(world)]
        rows = {(str(r["task_id"]), r["sample"]): r for f in [out, *parts] for r in read_samples(f, settings)}
        order = {str(t.task_id): i for i, t in enumerate(tasks)}
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text("".join(json.dumps(rows[k]) + "\n" for k in sorted(rows, key=lambda k: (order[k[0]], k[1]))))
        tmp.replace(out)
        for f in parts:
            f.unlink(missing_ok=True)
    dist_utils.barrier()
    return out
