"""Sudoku success rate by number of sampling steps x remask policy, resumable cell by cell."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from tqdm import tqdm

from prism_ds.config import SamplerConfig
from prism_ds.core.remask import POLICIES
from prism_ds.core.sampler import sample
from prism_ds.core.schedules import FixedKSchedule
from prism_ds.sudoku.board import MASK_ID, BoardSpec, is_solved


def solve(model, spec: BoardSpec, puzzles: torch.Tensor, steps: int, policy: str, cfg: SamplerConfig,
          progress: bool = False) -> torch.Tensor:
    """Fill the blanks of `puzzles` [N, L] in `steps` sampler steps; clues and separators stay fixed."""
    gen = torch.Generator(device=puzzles.device).manual_seed(cfg.seed)
    schedule = FixedKSchedule(remask_k=cfg.remask_k)
    outs = []
    for start in range(0, len(puzzles), cfg.batch_size):
        batch = puzzles[start:start + cfg.batch_size]
        outs.append(sample(model, batch, fixed=batch != MASK_ID, mask_id=MASK_ID, num_steps=steps, schedule=schedule,
                           policy=policy, unmask_order=cfg.unmask_order, temperature=cfg.temperature,
                           top_p=cfg.top_p, allowed_tokens=spec.digit_tokens().to(puzzles.device), generator=gen, progress=progress))
    return torch.cat(outs)


def success_table(model, spec: BoardSpec, puzzles: torch.Tensor, cfg: SamplerConfig, results_path: str | Path,
                  progress: bool = True) -> list[dict]:
    """Success rate for every (steps, policy) in cfg; finished cells are read back from results_path (JSONL)."""
    for policy in cfg.policies:
        if policy not in POLICIES:
            raise ValueError(f"sampler.policies: {policy!r} is not one of {POLICIES}")
    results_path = Path(results_path)
    done = {}
    if results_path.exists():
        for line in results_path.read_text().splitlines():
            row = json.loads(line)
            done[(row["steps"], row["policy"])] = row
    cells = [(st, p) for st in cfg.steps for p in cfg.policies]
    model.eval()
    for steps, policy in tqdm(cells, desc="evaluating steps x policy", disable=not progress):
        if (steps, policy) in done:
            continue
        filled = solve(model, spec, puzzles, steps, policy, cfg)
        row = {"steps": steps, "policy": policy, "remask_k": cfg.remask_k if policy != "none" else 0,
               "n": len(puzzles), "success": is_solved(spec, filled.cpu(), puzzles.cpu()).float().mean().item()}
        done[(steps, policy)] = row
        results_path.parent.mkdir(parents=True, exist_ok=True)
        with results_path.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
    return [done[c] for c in cells]


def format_table(rows: list[dict]) -> str:
    """Markdown table: one row per policy, one column per step count."""
    steps = sorted({r["steps"] for r in rows})
    policies = list(dict.fromkeys(r["policy"] for r in rows))
    cell = {(r["policy"], r["steps"]): r for r in rows}
    lines = ["| policy | " + " | ".join(f"{s} steps" for s in steps) + " |",
             "|---|" + "---|" * len(steps)]
    for p in policies:
        lines.append(f"| {p} | " + " | ".join(f"{100 * cell[p, s]['success']:.1f}%" if (p, s) in cell else "-"
                                             for s in steps) + " |")
    return "\n".join(lines)
