"""Unconditional generation for the paper's Table 2: every (policy row, N) cell sampled, scored and tabulated.

    prism-ds text-eval --model runs/owt/finetune/final --recipe owt_gpu

Each cell samples `text_eval.n_samples` sequences of `text.max_length` tokens from all-mask canvases with
the one sampler loop (rows `policy[:count][/schedule]`, core/schedules), writes them batch by batch to
`<out_dir>/samples/<row>_N<steps>.jsonl` (an interrupted run resumes), then scores gen-PPL, entropy and
MAUVE against held-out human text (the first `text.heldout_docs` documents of text.source).
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import replace
from pathlib import Path

import torch
from torch.utils.tensorboard import SummaryWriter

from prism_ds.config import ConfigError, RunConfig, SamplerConfig
from prism_ds.core.remask import parse_row
from prism_ds.core.sampler import SamplerSettings, sample
from prism_ds.core.schedules import even_family_schedule
from prism_ds.engine.distributed import device as default_device
from prism_ds.models.loading import load_model
from prism_ds.text.packed_data import heldout_sequences
from prism_ds.text.tokenizer import load_tokenizer
from prism_ds.textgen import table as tables
from prism_ds.textgen.samples import fill_cell, model_fingerprint

# Sampler settings that shape every cell alike (the row and N vary across the table, batch and seeds are recorded).
_SAMPLER_KEYS = ("remask_count", "remask_k", "eta", "eta_steps", "eta_cap", "remask_start", "loop_m", "loop_fraction",
                 "loop_t_on", "loop_t_off", "loop_alpha_on", "loop_eta", "unmask_order", "temperature", "top_p", "seed")


def _tokenizer(cfg: RunConfig):
    if not cfg.text.tokenizer and not Path(cfg.model.path).is_dir():
        raise ConfigError("text.tokenizer: empty and model.path is not a folder with one; set text.tokenizer "
                          "(MDLM's OWT model uses GPT-2's: text.tokenizer=gpt2 or a local copy)")
    text = cfg.text if cfg.text.tokenizer else replace(cfg.text, tokenizer=cfg.model.path)
    return load_tokenizer(text)


def row_sampler(s: SamplerConfig, policy: str) -> SamplerConfig:
    """The sampler settings of one row: appendix D.2's eta = eta_steps / N and l_on = ceil(remask_start * N) are
    PRISM's rule; baseline rows keep `sampler.eta` and may remask from the first step, as ReMDM defines them."""
    return s if policy == "prism" else dataclasses.replace(s, eta_steps=0.0, remask_start=0.0)


def _cell_seed(seed: int, row: str, steps: int, batch: int) -> int:
    """A seed per (row, N, batch): cells are independent and a resumed batch draws what it would have drawn."""
    return (seed * 1_000_003 + sum(map(ord, row)) * 7919 + steps * 104_729 + batch) % (2 ** 63)


def generate_batch(model, n: int, length: int, mask_id: int, row: str, steps: int, cfg: RunConfig,
                   generator: torch.Generator, allowed: torch.Tensor | None = None,
                   progress: bool = False) -> torch.Tensor:
    """n sequences of `length` tokens sampled from all-mask canvases with one table row's policy and schedule."""
    policy, count, kind = parse_row(row, cfg.sampler.remask_count)
    s = row_sampler(cfg.sampler, policy)
    schedule = even_family_schedule(kind, count, s, steps)
    device = next(model.parameters()).device
    tokens = torch.full((n, length), mask_id, dtype=torch.long, device=device)
    settings = SamplerSettings.from_config(s, mask_id, steps, schedule, policy, allowed_tokens=allowed)
    return sample(model, tokens, torch.zeros_like(tokens, dtype=torch.bool), settings, generator=generator,
                  progress=progress)


def check_rows(cfg: RunConfig, has_head: bool) -> None:
    """Every row and N builds a schedule, and PRISM rows have a head, before anything is sampled."""
    if not cfg.sampler.steps or not cfg.sampler.policies:
        raise ConfigError("sampler.steps and sampler.policies must each list at least one value")
    for row in cfg.sampler.policies:
        policy, count, kind = parse_row(row, cfg.sampler.remask_count)
        if policy == "prism" and not has_head:
            raise ConfigError(f"sampler.policies: {row!r} needs a quality head; pass a PRISM fine-tuned export")
        for steps in cfg.sampler.steps:
            even_family_schedule(kind, count, row_sampler(cfg.sampler, policy), steps)


def text_table(cfg: RunConfig, model_path: str | Path, progress: bool = True) -> str:
    """Sample, score and tabulate every (row, N) cell; returns the markdown table (also written to out_dir)."""
    te, device = cfg.text_eval, default_device()
    out_dir = Path(te.out_dir or Path(cfg.run_dir) / "text_eval")
    model, _ = load_model(model_path, device)
    check_rows(cfg, model.quality_head is not None)
    # Fail before hours of sampling when a scoring model is not available offline.
    tables.metrics.load_tokenizer(te.scorer, "scorer", "text_eval.scorer")
    if te.featurizer:
        tables.metrics.load_tokenizer(te.featurizer, "featurizer", "text_eval.featurizer")
    tokenizer = _tokenizer(cfg)
    mask_id = getattr(model.backbone, "mask_id", None)
    if mask_id is None:
        raise ConfigError(f"{model_path}: the backbone has no mask id (not a masked-diffusion DiT export)")
    vocab = model.backbone.vocab_size
    allowed = torch.arange(vocab, device=device) < len(tokenizer)
    allowed[mask_id] = False
    length = cfg.text.max_length
    if cfg.text.heldout_docs < 1:
        raise ConfigError("text.heldout_docs must be >= 1: the held-out documents are MAUVE's human text")
    refs = heldout_sequences(cfg.text, tokenizer, min(te.mauve_references, cfg.text.heldout_docs))
    references = tokenizer.batch_decode(refs.tolist())
    common = {"model": model_fingerprint(model_path), "length": length, "tokenizer": len(tokenizer),
              **{k: getattr(cfg.sampler, k) for k in _SAMPLER_KEYS}}
    cells = [tables.score_references(references, te.scorer, out_dir / "data.scores.json", str(device),
                                     te.scorer_batch_size, progress, scorer_dtype=te.scorer_dtype)]
    for row in cfg.sampler.policies:
        for steps in cfg.sampler.steps:
            settings = {**common, "policy": row, "steps": steps}
            name = re.sub(r"[^A-Za-z0-9_.-]+", "_", row)

            def make_batch(b: int, size: int, row=row, steps=steps) -> list[dict]:
                gen = torch.Generator(device=device).manual_seed(_cell_seed(cfg.sampler.seed, row, steps, b))
                ids = generate_batch(model, size, length, mask_id, row, steps, cfg, gen, allowed).tolist()
                return [{"tokens": t, "text": tokenizer.decode(t)} for t in ids]

            path = fill_cell(out_dir / "samples" / f"{name}_N{steps}.jsonl", settings, te.n_samples, te.batch_size,
                             make_batch, progress)
            cells.append(tables.score_cell(path, te.scorer, te.featurizer or None, references, str(device),
                                           te.scorer_batch_size, te.scorer_batch_size, length,
                                           cache_dir=out_dir, progress=progress, scorer_dtype=te.scorer_dtype))
    table = tables.table2(cells)
    header = f"Samples of {length} tokens from {model_path}, rows `policy[:count][/schedule]`.\n\n"
    (out_dir / "results.md").write_text(header + table + "\n")
    _log(out_dir / "tb", cells, table)
    return header + table


def _log(tb_dir: Path, cells: list[dict], table: str) -> None:
    """TensorBoard: each row's MAUVE, gen-PPL and entropy against N, and the table as text."""
    with SummaryWriter(str(tb_dir)) as writer:
        for c in cells:
            if c.get("policy") == tables.DATA_ROW:
                continue
            for metric in ("mauve", "gen_ppl", "entropy"):
                if c.get(metric) is not None:
                    writer.add_scalar(f"text_eval/{c['policy']}/{metric}", c[metric], c["steps"])
        writer.add_text("text_eval/table", table)
