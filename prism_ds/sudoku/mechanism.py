"""Does a remask score find the wrong cells of the CURRENT Sudoku board? PRISM's §4.1 claim, measured directly.

Trajectories come from the real sampler (vanilla by default, so every score is judged on the same states: a paired
comparison). Each step's state (the board before the step) is replayed and every clean non-fixed cell is scored,
lower = more suspicious:
  prism       the quality head's logit g on the current board (one pass per state)
  confidence  the cell's probability when it was unmasked, under the distribution it was drawn from (ReMDM-conf's
              stored score, computed on an older board)
  loo         the backbone's probability of the cell's token with only that cell masked on the current board,
              p(x_i = y_i | y + m_i): what g is trained to approximate, training-free, one pass per cell
  uniform     random (ReMDM)
plus any extra scorer (tokens [B, L], fixed [B, L]) -> [B, L]. The DiT's SUBS logits copy clean tokens with
probability 1, so "the current pass's probability of the cell's token" is no score for this backbone.
Metrics (summarize): AUROC of wrong cells pooled over (state, cell) pairs and within states, and precision among
the K lowest-scored cells of a state, each with paired 95% intervals over trajectories.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import torch
from tqdm import tqdm

from prism_ds.config import SamplerConfig
from prism_ds.core.metrics import mean_ci95
from prism_ds.core.remask import parse_row
from prism_ds.core.sampler import SamplerSettings, SamplingRecord, sample
from prism_ds.core.sampling_utils import drawing_logits, select_top
from prism_ds.core.schedules import even_family_schedule
from prism_ds.sudoku.board import MASK_ID, BoardSpec
from prism_ds.sudoku.generator import _Solver

Scorer = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
NAMES = {"prism": "PRISM g (current board)", "confidence": "ReMDM-conf (p at unmasking)",
         "loo": "leave-one-out p (current board)", "uniform": "uniform (ReMDM)"}


@dataclass
class Record:
    """Per-state tensors [S, B, L] (S steps, B trajectories): the states, which cells are scored, which are wrong."""

    states: torch.Tensor  # the board before each step
    cand: torch.Tensor  # clean non-fixed cells of rows that still had masks (the sampler was acting on them)
    wrong: torch.Tensor  # cand cells that differ from the solution
    scores: dict[str, torch.Tensor]  # float64, lower = more suspicious, NaN outside cand
    final: torch.Tensor  # [B, L] the sampler's output
    final_wrong: torch.Tensor  # [B, L] wrong non-fixed cells of the final board
    final_conf: torch.Tensor  # [B, L] each final cell's probability when it was (last) unmasked


def solutions_of(spec: BoardSpec, puzzles: torch.Tensor) -> torch.Tensor:
    """The unique solution [N, L] of each puzzle; ValueError naming the first puzzle without exactly one."""
    solver, out = _Solver(spec), []
    for row, cells in enumerate(spec.to_grids(puzzles.cpu()).flatten(1).tolist()):  # backtracking is per board
        count, solution = solver.solve(cells, None, limit=2)
        if count != 1:
            raise ValueError(f"puzzle {row}: {'no' if count == 0 else 'several'} solutions; 'wrong' needs exactly one")
        out.append(solution)
    return spec.to_tokens(torch.tensor(out).view(-1, spec.n, spec.n))


def drawn_prob(logits: torch.Tensor, tokens: torch.Tensor, allowed: torch.Tensor, temperature: float = 1.0,
               top_p: float = 1.0) -> torch.Tensor:
    """Probability of `tokens` under the distribution the sampler draws from (allowed tokens, no mask, tempered,
    nucleus-renormalised), as sampler._draw / sample_tokens store it for remdm-conf."""
    lg = logits.double().masked_fill(~allowed.to(logits.device), float("-inf"))
    lg[..., MASK_ID] = float("-inf")
    return drawing_logits(lg, temperature, top_p).softmax(-1).gather(-1, tokens[..., None]).squeeze(-1)


def leave_one_out(model, tokens: torch.Tensor, cand: torch.Tensor, allowed: torch.Tensor,
                  chunk: int = 4096) -> torch.Tensor:
    """[B, L] float64: the backbone's (untempered, digits-only) probability of each cand cell's token with only
    that cell masked; NaN elsewhere. One board copy per cell, passed in chunks."""
    b, i = cand.nonzero(as_tuple=True)
    out = torch.full(tokens.shape, float("nan"), dtype=torch.float64, device=tokens.device)
    for lo in range(0, len(b), chunk):
        bb, ii = b[lo:lo + chunk], i[lo:lo + chunk]
        r = torch.arange(len(bb), device=tokens.device)
        boards = tokens[bb].clone()
        boards[r, ii] = MASK_ID
        logits = model(boards, need_logits=True, need_quality=False).logits[r, ii]
        out[bb, ii] = drawn_prob(logits, tokens[bb, ii], allowed)
    return out


def _trajectory(model, spec: BoardSpec, batch: torch.Tensor, steps: int, variant: str, cfg: SamplerConfig,
                gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(states [S, B, L] before each step, tokens after each step [S, B, L], unmasked [S, B, L]) of one batch."""
    policy, count, kind = parse_row(variant, cfg.remask_count)
    if kind in ("loop", "remdm-loop"):  # their pass sees a board with random cells remasked, not the step's state
        raise ValueError(f"{variant!r}: loop steps remask before their pass; use an even or ancestral row")
    record = SamplingRecord(keep_steps=True)
    settings = SamplerSettings.from_config(cfg, MASK_ID, steps, even_family_schedule(kind, count, cfg, steps), policy,
                                           allowed_tokens=spec.digit_tokens().to(batch.device))
    sample(model, batch, batch != MASK_ID, settings, generator=gen, record=record)
    history = record.steps
    after = torch.stack([h[0] for h in history])
    unmasked = torch.stack([h[2] for h in history])
    return torch.cat([batch[None], after[:-1]]), after, unmasked


@torch.no_grad()
def measure(model, spec: BoardSpec, puzzles: torch.Tensor, solutions: torch.Tensor, steps: int, cfg: SamplerConfig,
            variant: str = "none", seed: int | None = None, extra_scorers: dict[str, Scorer] | None = None,
            loo_chunk: int = 4096, progress: bool = True) -> Record:
    """Sample `variant` trajectories of `puzzles` [N, L] in `steps` steps and score every state's clean cells."""
    model.eval()
    device, allowed = puzzles.device, spec.digit_tokens().to(puzzles.device)
    seed = cfg.seed if seed is None else seed
    gen = torch.Generator(device=device).manual_seed(seed)  # one stream over batches, as evaluate.solve
    uniform_gen = torch.Generator(device=device).manual_seed(seed + 1)
    has_head = getattr(model, "quality_head", None) is not None
    parts: list[dict] = []
    for start in tqdm(range(0, len(puzzles), cfg.batch_size), desc=f"mechanism N={steps}", disable=not progress):
        batch, sol = puzzles[start:start + cfg.batch_size], solutions[start:start + cfg.batch_size].to(device)
        fixed = batch != MASK_ID
        states, after, unmasked = _trajectory(model, spec, batch, steps, variant, cfg, gen)
        conf = torch.ones(batch.shape, dtype=torch.float64, device=device)  # as the sampler: 1 until unmasked
        rec: dict[str, list] = {"cand": [], "wrong": [], "scores": []}
        for s in tqdm(range(len(states)), desc="replay", leave=False, disable=not progress):
            x = states[s]
            out = model(x, need_logits=True, need_quality=has_head)
            active = ((x == MASK_ID) & ~fixed).any(1, keepdim=True)  # a finished row takes no more steps
            cand = (x != MASK_ID) & ~fixed & active
            scores = {"prism": out.quality.double()} if has_head else {}
            scores["confidence"] = conf.clone()  # before this step's update: what remdm-conf reads at step s
            scores["loo"] = leave_one_out(model, x, cand, allowed, loo_chunk)
            scores["uniform"] = torch.rand(x.shape, generator=uniform_gen, dtype=torch.float64, device=device)
            for name, fn in (extra_scorers or {}).items():
                scores[name] = fn(x, fixed).double()
            nan = torch.full_like(conf, float("nan"))
            rec["scores"].append({k: torch.where(cand, v, nan).cpu() for k, v in scores.items()})
            rec["cand"].append(cand.cpu())
            rec["wrong"].append((cand & (x != sol)).cpu())
            # This pass is the one step s drew from: it gives the confidence of the cells unmasked at step s.
            conf = torch.where(unmasked[s], drawn_prob(out.logits, after[s], allowed, cfg.temperature, cfg.top_p),
                               conf)
        final = after[-1]
        parts.append({"states": states.cpu(), "cand": torch.stack(rec["cand"]), "wrong": torch.stack(rec["wrong"]),
                      "scores": {k: torch.stack([d[k] for d in rec["scores"]]) for k in rec["scores"][0]},
                      "final": final.cpu(), "final_wrong": ((final != sol) & ~fixed).cpu(), "final_conf": conf.cpu()})
    S = max(len(p["cand"]) for p in parts)  # batches whose rows all finished early have fewer steps: pad

    def cat(key: str, fill, get=lambda p, k: p[k]) -> torch.Tensor:
        padded = [torch.cat([t, t[-1:].clone().fill_(fill).expand(S - len(t), *t.shape[1:])]) if len(t) < S else t
                  for t in (get(p, key) for p in parts)]
        return torch.cat(padded, dim=1)

    return Record(states=cat("states", MASK_ID), cand=cat("cand", False), wrong=cat("wrong", False),
                  scores={k: cat(k, float("nan"), lambda p, k: p["scores"][k]) for k in parts[0]["scores"]},
                  **{key: torch.cat([p[key] for p in parts]) for key in ("final", "final_wrong", "final_conf")})


def weighted_auroc(suspicion: torch.Tensor, positive: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """AUROC [R] of `suspicion` [n] for `positive` [n] under each weight row [R, n] (or [n]); ties count half.

    One sort, then per tie group the positive / negative weight, and cumulative negatives below each group."""
    if len(suspicion) == 0:  # e.g. the state before the first step: no clean cell yet
        return torch.full((weights.shape[0] if weights.dim() == 2 else 1,), math.nan, dtype=torch.float64)
    weights = weights.double().reshape(-1, len(suspicion))
    order = suspicion.double().argsort()
    _, group = torch.unique_consecutive(suspicion.double()[order], return_inverse=True)
    pos, w = positive.bool()[order], weights[:, order]
    n_groups = int(group.max()) + 1
    wp = torch.zeros(len(w), n_groups, dtype=torch.float64).index_add_(1, group, w * pos)
    wn = torch.zeros(len(w), n_groups, dtype=torch.float64).index_add_(1, group, w * ~pos)
    below = wn.cumsum(1) - wn
    den = wp.sum(1) * wn.sum(1)
    return torch.where(den > 0, (wp * (below + 0.5 * wn)).sum(1) / den, torch.full_like(den, float("nan")))


def state_auroc(scores: torch.Tensor, cand: torch.Tensor, wrong: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """[S, B] AUROC of wrong cells within each state (the ranking a remask step uses); NaN without both classes."""
    flat_s, flat_c, flat_w = (t.reshape(-1, t.shape[-1]) for t in (-scores.double(), cand, wrong))
    out = []
    for lo in range(0, len(flat_s), chunk):  # all (wrong i, right j) pairs of a state: [rows, L, L]
        susp, pos, neg = flat_s[lo:lo + chunk], flat_w[lo:lo + chunk], flat_c[lo:lo + chunk] & ~flat_w[lo:lo + chunk]
        pairs = (pos[:, :, None] & neg[:, None, :]).double()
        diff = susp[:, :, None] - susp[:, None, :]
        won = ((diff > 0).double() + 0.5 * (diff == 0).double()) * pairs
        n = pairs.sum((1, 2))
        out.append(torch.where(n > 0, won.sum((1, 2)) / n, torch.full_like(n, math.nan)))
    return torch.cat(out).view(cand.shape[:2])


def precision_at_k(scores: torch.Tensor, cand: torch.Tensor, wrong: torch.Tensor, k: int,
                   generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(precision [S, B] of the k lowest-scored cand cells, ties at random; eligible [S, B]: more than k cells)."""
    flat = lambda t: t.reshape(-1, t.shape[-1])  # noqa: E731
    pick = select_top(-flat(scores), flat(cand), torch.full((flat(cand).shape[0],), k, dtype=torch.long),
                      generator=generator, random_ties=True)
    prec = (pick & flat(wrong)).sum(-1).double() / k
    return prec.view(cand.shape[:2]), cand.sum(-1) > k


def _ci(values: torch.Tensor) -> list[float]:
    """Percentile 95% interval of bootstrap values (NaN resamples, e.g. with no wrong cell, left out)."""
    v = values[~values.isnan()]
    return [float(v.quantile(0.025)), float(v.quantile(0.975))] if len(v) else [math.nan, math.nan]


def summarize(rec: Record, k: int, n_boot: int = 1000, seed: int = 0, reference: str | None = None,
              high: float = 0.9, progress: bool = True) -> dict:
    """Every score's AUROC and precision@k with paired 95% intervals over trajectories, vs `reference` (prism)."""
    names = list(rec.scores)
    ref = reference or ("prism" if "prism" in names else names[0])
    S, B, _ = rec.cand.shape
    traj = torch.arange(B)[None, :, None].expand_as(rec.cand)[rec.cand]
    pos = rec.wrong[rec.cand]
    gen = torch.Generator().manual_seed(seed)
    # The same trajectory resample for every score, so differences are paired.
    counts = torch.zeros(n_boot, B, dtype=torch.float64).scatter_add_(
        1, torch.randint(B, (n_boot, B), generator=gen), torch.ones(n_boot, B, dtype=torch.float64))
    chunk = max(1, int(5e6 // max(1, len(traj))))  # resamples per weight matrix [chunk, cells]: ~40 MB each
    stats: dict[str, dict[str, tuple[float, torch.Tensor]]] = {}  # name -> metric -> (point, bootstrap values)
    for name in tqdm(names, desc="bootstrap", disable=not progress):
        susp = -rec.scores[name][rec.cand]
        boot = torch.cat([weighted_auroc(susp, pos, counts[lo:lo + chunk][:, traj]) for lo in range(0, n_boot, chunk)])
        # Within-state AUROC: a remask step only ranks the cells of one board, so pooled AUROC also rewards a
        # scale that is comparable across states; mean over states with both classes, resampled as ratios of sums.
        per_state = state_auroc(rec.scores[name], rec.cand, rec.wrong)
        total, n_states = per_state.nan_to_num(0.0).sum(0), (~per_state.isnan()).sum(0).double()
        stats[name] = {"auroc": (float(weighted_auroc(susp, pos, torch.ones(len(susp)))[0]), boot),
                       "within": (float(total.sum() / n_states.sum()) if n_states.sum() else math.nan,
                                  (counts @ total) / (counts @ n_states))}
    # Precision@k: per-trajectory means over its eligible states (the same states for every score).
    tie_gen = torch.Generator().manual_seed(seed + 1)
    per_traj = {}
    for name in names:
        prec, elig = precision_at_k(rec.scores[name], rec.cand, rec.wrong, k, tie_gen)
        per_traj[name] = (prec * elig).sum(0) / elig.sum(0)
    units = elig.sum(0) > 0
    rows = {}
    for name in names:
        row = {}
        for metric, (point, boot) in stats[name].items():
            ref_point, ref_boot = stats[ref][metric]
            row |= {metric: point, f"{metric}_ci": _ci(boot), f"{metric}_diff": ref_point - point,
                    f"{metric}_diff_ci": _ci(ref_boot - boot)}
        (p, half), (d, dhalf) = mean_ci95(per_traj[name][units]), mean_ci95((per_traj[ref] - per_traj[name])[units])
        row |= {"precision": p, "precision_ci": [p - half, p + half], "precision_diff": d,
                "precision_diff_ci": [d - dhalf, d + dhalf],
                "auroc_per_step": [float(weighted_auroc(-rec.scores[name][s][rec.cand[s]], rec.wrong[s][rec.cand[s]],
                                                        torch.ones(int(rec.cand[s].sum())))[0]) for s in range(S)]}
        rows[name] = row
    n_wrong, n_high = rec.final_wrong.sum(1).double(), (rec.final_wrong & (rec.final_conf >= high)).sum(1).double()
    return {"reference": ref, "k": k, "n_boot": n_boot, "high": high, "scores": rows,
            "high_conf_errors": {"share": float(n_high.sum() / n_wrong.sum()) if n_wrong.sum() else math.nan,
                                 "ci": _ci((counts @ n_high) / (counts @ n_wrong)), "wrong": int(n_wrong.sum()),
                                 "high": int(n_high.sum())},
            "counts": {"trajectories": B, "states": int(rec.cand.any(-1).sum()), "cells": len(traj),
                       "wrong_cells": int(pos.sum()), "precision_states": int(elig.sum()),
                       "precision_trajectories": int(units.sum()), "cells_per_step": rec.cand.sum((1, 2)).tolist(),
                       "wrong_per_step": rec.wrong.sum((1, 2)).tolist(), "final_boards_wrong": int((n_wrong > 0).sum()),
                       "within_states": int((rec.wrong.any(-1) & (rec.cand & ~rec.wrong).any(-1)).sum())}}


def format_markdown(summary: dict, title: str = "") -> str:
    """The summary as a markdown table (rows = scores), the per-step AUROC table and the counts."""
    ref, k, c = summary["reference"], summary["k"], summary["counts"]

    def iv(r: dict, key: str, f: str = "{:.3f}") -> str:
        lo, hi = r[key + "_ci"]
        return f"{f.format(r[key])} [{f.format(lo)}, {f.format(hi)}]"

    lines = ([f"### {title}", ""] if title else []) + [
        f"| score (lower = more suspicious) | AUROC [95% CI] | {ref} − this AUROC [CI] | precision@{k} [CI] | "
        f"{ref} − this [CI] | within-state AUROC [CI] | {ref} − this [CI] |", "|---|---|---|---|---|---|---|"]
    for name, r in summary["scores"].items():
        cells = [iv(r, key) if i % 2 == 0 else iv(r, key + "_diff", "{:+.3f}")
                 for i, key in enumerate(["auroc", "auroc", "precision", "precision", "within", "within"])]
        lines.append(f"| {NAMES.get(name, name)} | " + " | ".join(cells) + " |")
    steps = len(c["cells_per_step"])
    lines += ["", "Pooled AUROC by step (state = the board before the step):", "",
              "| score | " + " | ".join(f"s={s}" for s in range(steps)) + " |", "|---|" + "---|" * steps,
              "| cells / wrong | " + " | ".join(f"{a} / {b}" for a, b in zip(c["cells_per_step"], c["wrong_per_step"]))
              + " |"]
    for name, r in summary["scores"].items():
        lines.append(f"| {NAMES.get(name, name)} | " + " | ".join("–" if math.isnan(v) else f"{v:.3f}"
                                                                  for v in r["auroc_per_step"]) + " |")
    h = summary["high_conf_errors"]
    lines += ["", f"- Final boards: {h['wrong']} wrong cells in {c['final_boards_wrong']} of {c['trajectories']} "
              f"boards; {h['high']} of them ({100 * h['share']:.1f}%, 95% CI {100 * h['ci'][0]:.1f}–"
              f"{100 * h['ci'][1]:.1f}%) had probability ≥ {summary['high']} when unmasked.",
              f"- Counts: {c['trajectories']} trajectories, {c['states']} states, {c['cells']} scored cells, "
              f"{c['wrong_cells']} wrong. AUROC: wrong = positive, pooled over (state, cell) pairs; within-state: "
              f"mean AUROC over the {c['within_states']} states with wrong and right cells; AUROC intervals: "
              f"{summary['n_boot']} paired bootstrap resamples of trajectories (percentile). Precision@{k}: mean over "
              f"trajectories of each one's mean over its {c['precision_states']} states with > {k} clean cells "
              f"({c['precision_trajectories']} trajectories), ties at random; ±1.96 s.e., paired differences.",
              "- The DiT's SUBS logits give every clean cell probability 1 on the current pass, so the current pass's "
              "probability of a cell's token is not a score here; leave-one-out masks the cell instead."]
    return "\n".join(lines)


def to_jsonable(summary: dict) -> dict:
    """The summary with NaN as None (strict JSON)."""
    def fix(v):
        if isinstance(v, float):
            return None if math.isnan(v) else v
        if isinstance(v, dict):
            return {k: fix(x) for k, x in v.items()}
        return [fix(x) for x in v] if isinstance(v, list) else v
    return fix(summary)


def report(model, spec: BoardSpec, puzzles: torch.Tensor, cfg: SamplerConfig, steps_list: list[int],
           source: str = "", policy: str = "none", seed: int | None = None, k: int | None = None,
           n_boot: int = 1000, extra_scorers: dict[str, Scorer] | None = None,
           progress: bool = True) -> tuple[str, dict]:
    """The mechanism report (markdown, JSON-able dict) of `model` on `puzzles` at every N in steps_list."""
    k = cfg.remask_k if k is None else k
    solutions = solutions_of(spec, puzzles)
    header = (f"Detection of wrong cells on {len(puzzles)} {spec.n}x{spec.n} puzzles{source}; trajectories: sampler "
              f"row {policy!r}, temperature {cfg.temperature}, top_p {cfg.top_p}, unmask order {cfg.unmask_order}, "
              f"seed {cfg.seed if seed is None else seed}.")
    sections, results = [header], {"header": header, "steps": {}}
    for steps in steps_list:
        start = time.perf_counter()
        rec = measure(model, spec, puzzles, solutions, steps, cfg, variant=policy, seed=seed,
                      extra_scorers=extra_scorers, progress=progress)
        summary = summarize(rec, k, n_boot=n_boot, progress=progress)
        wall = time.perf_counter() - start
        sections.append(format_markdown(summary, f"N = {steps} steps") + f"\n- Wall time: {wall:.1f} s.")
        results["steps"][str(steps)] = {**to_jsonable(summary), "wall_s": wall}
    return "\n\n".join(sections), results
