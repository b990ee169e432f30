"""Sudoku success rate by number of sampling steps x remask variant x seed, resumable cell by cell.

Each cell keeps which puzzles it solved, so the table reports per-cell 95% intervals over puzzles and
a paired comparison of PRISM with the strongest baseline on the same puzzles and seeds.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from prism_ds.config import RunConfig, SamplerConfig, to_dict
from prism_ds.core.metrics import mean_ci95
from prism_ds.core.remask import no_quality_error, parse_row
from prism_ds.core.sampler import SamplerSettings, sample
from prism_ds.core.schedules import even_family_schedule
from prism_ds.engine import distributed as dist_utils
from prism_ds.models.critic import CriticScored, critic_for
from prism_ds.models.loading import load_model
from prism_ds.models.weights import backbone_file, content_hash
from prism_ds.sudoku.board import MASK_ID, BoardSpec, is_solved
from prism_ds.sudoku.data import board_spec, eval_puzzles

# Sampler keys that choose which cells exist (not how a cell is computed): left out of the cache key.
# (batch_size stays in: the random draws of a batch depend on its size.) The critic's path is left out too: its
# content is hashed instead, when a row uses it.
_CELL_KEYS = ("steps", "policies", "n_seeds", "critic", "mechanism_puzzles")


def solve(model, spec: BoardSpec, puzzles: torch.Tensor, steps: int, variant: str, cfg: SamplerConfig,
          seed: int | None = None, progress: bool = False, critic=None) -> torch.Tensor:
    """Fill the blanks of `puzzles` [N, L] in `steps` sampler steps; clues and separators stay fixed.

    variant: a sampler row "policy[:count][/schedule]" ("remdm:binomial", "prism/loop"); seed: default cfg.seed.
    critic: the Token-Critic critic that token-critic rows score with (models/critic.py); other rows ignore it.
    """
    policy, count, kind = parse_row(variant, cfg.remask_count)
    seed = cfg.seed if seed is None else seed
    gen = torch.Generator(device=puzzles.device).manual_seed(seed)
    schedule = even_family_schedule(kind, count, cfg, steps)
    if policy == "token-critic":  # f_theta's logits, the critic's scores of x̂ as quality (its own draws)
        if critic is None:
            raise no_quality_error(policy)
        model = CriticScored(model, critic, MASK_ID, spec.digit_tokens().to(puzzles.device), seed=seed,
                             temperature=cfg.temperature, top_p=cfg.top_p)
    settings = SamplerSettings.from_config(cfg, MASK_ID, steps, schedule, policy,
                                           allowed_tokens=spec.digit_tokens().to(puzzles.device))
    outs = []
    for start in range(0, len(puzzles), cfg.batch_size):
        batch = puzzles[start:start + cfg.batch_size]
        outs.append(sample(model, batch, batch != MASK_ID, settings, generator=gen, progress=progress))
    return torch.cat(outs)


def success_table(model, spec: BoardSpec, puzzles: torch.Tensor, cfg: SamplerConfig, results_path: str | Path,
                  progress: bool = True, critic=None, critic_id: str | None = None) -> list[dict]:
    """One row per (steps, variant, seed) in cfg; finished cells are read back from results_path (JSONL).

    critic: what token-critic rows score with (see solve); critic_id names its content: a token-critic cell is
    read back only when it was computed with the same critic, so the other rows never wait for a new critic."""
    for variant in cfg.policies:  # fail before any sampling
        _, count, kind = parse_row(variant, cfg.remask_count)
        for steps in cfg.steps:
            even_family_schedule(kind, count, cfg, steps)
    if cfg.n_seeds < 1:
        raise ValueError(f"sampler.n_seeds={cfg.n_seeds} must be >= 1")
    results_path = Path(results_path)
    done = {}
    if results_path.exists():
        for line in results_path.read_text().splitlines():
            row = json.loads(line)
            if parse_row(row["policy"])[0] != "token-critic" or row.get("critic") == critic_id:
                done[(row["steps"], row["policy"], row["seed"])] = row
    seeds = [cfg.seed + i for i in range(cfg.n_seeds)]
    cells = [(st, v, sd) for st in cfg.steps for v in cfg.policies for sd in seeds]
    model.eval()
    for steps, variant, seed in tqdm(cells, desc="evaluating steps x policy x seed", disable=not progress):
        if (steps, variant, seed) in done:
            continue
        solved = is_solved(spec, solve(model, spec, puzzles, steps, variant, cfg, seed, critic=critic).cpu(),
                           puzzles.cpu())
        row = {"steps": steps, "policy": variant, "seed": seed, "n": len(puzzles),
               "success": solved.float().mean().item(), "solved": "".join("01"[int(b)] for b in solved.tolist()),
               **({"critic": critic_id} if parse_row(variant)[0] == "token-critic" else {})}
        done[(steps, variant, seed)] = row
        results_path.parent.mkdir(parents=True, exist_ok=True)
        with results_path.open("a") as fh:  # append per cell: an interrupted evaluation loses nothing
            fh.write(json.dumps(row) + "\n")
    return [done[c] for c in cells]


def _per_puzzle(rows: list[dict], steps: int, variant: str) -> torch.Tensor:
    """Each puzzle's success averaged over the seeds of one cell: [n_puzzles]."""
    runs = [torch.tensor([c == "1" for c in r["solved"]], dtype=torch.float64)
            for r in rows if r["steps"] == steps and r["policy"] == variant]
    return torch.stack(runs).mean(0)


def format_table(rows: list[dict]) -> str:
    """Markdown table (policies x steps, mean success ± 95% interval) and PRISM's paired lead."""
    steps = sorted({r["steps"] for r in rows})
    variants = list(dict.fromkeys(r["policy"] for r in rows))
    n_seeds = len({r["seed"] for r in rows})
    stats = {(v, s): mean_ci95(_per_puzzle(rows, s, v)) for v in variants for s in steps}
    lines = ["| policy | " + " | ".join(f"{s} steps" for s in steps) + " |", "|---|" + "---|" * len(steps)]
    for v in variants:
        lines.append(f"| {v} | " + " | ".join(f"{100 * stats[v, s][0]:.1f} ± {100 * stats[v, s][1]:.1f}"
                                             for s in steps) + " |")
    lines.append(f"\nCells: % solved, mean over {n_seeds} sampler seed(s) ± 95% interval over puzzles.")
    baselines = [v for v in variants if parse_row(v)[0] not in ("prism", "none")]
    for prism in (v for v in variants if parse_row(v)[0] == "prism"):
        for s in steps if baselines else []:
            best = max(baselines, key=lambda v: stats[v, s][0])
            lead, half = mean_ci95(_per_puzzle(rows, s, prism) - _per_puzzle(rows, s, best))
            lines.append(f"- {s} steps: {prism} − strongest baseline ({best}) = {100 * lead:+.1f} points "
                         f"(paired, 95% interval {100 * (lead - half):+.1f} to {100 * (lead + half):+.1f})")
        others = [v for v in variants if v != prism]
        if others:  # against every row: a lead counts where its interval excludes 0
            lines += ["", f"{prism} − row, points (paired over puzzles and seeds, 95% interval):", "",
                      "| row | " + " | ".join(f"{s} steps" for s in steps) + " |", "|---|" + "---|" * len(steps)]
            for v in others:
                cells = (mean_ci95(_per_puzzle(rows, s, prism) - _per_puzzle(rows, s, v)) for s in steps)
                lines.append(f"| {v} | " + " | ".join(f"{100 * d:+.1f} [{100 * (d - h):+.1f}, {100 * (d + h):+.1f}]"
                                                      for d, h in cells) + " |")
    return "\n".join(lines)


def results_key(checkpoint: str | Path, puzzles_path: Path, cfg: SamplerConfig, critic: str | Path | None = None
                ) -> str:
    """Cache key from the checkpoint's content (meta + weights), the puzzles' content and the sampler settings, and
    a critic's content when given (the mechanism report; the table records it per token-critic cell instead)."""
    checkpoint = Path(checkpoint)
    files = [checkpoint / "meta.json", backbone_file(checkpoint), *sorted(checkpoint.glob("quality_head*.safetensors")),
             puzzles_path]
    settings = {k: v for k, v in to_dict(cfg).items() if k not in _CELL_KEYS}
    return content_hash(files, json.dumps(settings, sort_keys=True) + (critic_content(critic) if critic else ""))


def critic_content(critic: str | Path) -> str:
    """Content hash of a critic export (meta + weights): which critic computed a token-critic cell."""
    critic = Path(critic)
    return content_hash([critic / "meta.json", backbone_file(critic), critic / "quality_head.safetensors"], "")


def evaluate_checkpoint(checkpoint: str | Path, cfg: RunConfig, progress: bool = True) -> str:
    """Success table of a checkpoint on the run's evaluation puzzles; results are cached next to it."""
    device = dist_utils.device()
    model, ckpt_cfg = load_model(checkpoint, device)
    spec = board_spec(ckpt_cfg)
    if board_spec(cfg) != spec:
        raise ValueError(f"{checkpoint} was trained on {spec.n}x{spec.n} boards but data.box_rows/box_cols "
                         f"ask for {board_spec(cfg).n}x{board_spec(cfg).n}")
    s = cfg.sampler
    # Before any sampling: a missing critic fails now, not after the other rows.
    critic, critic_path = critic_for(s.policies, s, cfg.run_dir, device, checkpoint)
    puzzles, path = eval_puzzles(cfg, progress)
    key = results_key(checkpoint, path, s)
    critic_id = critic_content(critic_path) if critic_path else None
    out_dir = Path(checkpoint).parent / "eval"
    rows = success_table(model, spec, puzzles.to(device), s, out_dir / f"results_{key}.jsonl", progress, critic,
                         critic_id)
    with SummaryWriter(str(out_dir / f"tb_{key}")) as writer:  # x axis = number of sampler steps
        for st in s.steps:
            for v in s.policies:
                writer.add_scalar(f"success/{v}", mean_ci95(_per_puzzle(rows, st, v))[0], st)
    header = (f"Success rate on {len(puzzles)} {spec.n}x{spec.n} puzzles with {cfg.data.blanks} blanks "
              f"({path}); remask count {s.remask_count} (K={s.remask_k}, eta={s.eta}) unless a row names its own, "
              f"unmask order {s.unmask_order}, temperature {s.temperature}; results cache key {key}"
              + (f"; token-critic rows score with the critic {critic_path}" if critic_path else ""))
    return header + "\n\n" + format_table(rows)
