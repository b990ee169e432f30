"""Does PRISM's quality g find the wrong cells of the CURRENT board that ReMDM and ReMDM-conf miss? (§4.1, Fig. 3)

Samples trajectories of the run's evaluation puzzles (vanilla by default, so every score is judged on the same
states), replays every step's board and scores its clean cells with PRISM's g, the confidence at unmasking
(ReMDM-conf), the leave-one-out MDM probability and uniform noise; prints detection AUROC and precision@K with
paired 95% intervals over trajectories. The logic lives in prism_ds/sudoku/mechanism.py.

    .venv/bin/python eval/mechanism.py --checkpoint runs/sudoku-cpu/finetune/final [--puzzles 500] [--steps 4 10]
        [--policy none] [--temperature 1.0] [--out runs/sudoku-cpu/finetune/eval/mechanism.md] [overrides ...]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from prism_ds.config import load_config
from prism_ds.engine.cpu_kernels import use_cpu_kernels
from prism_ds.models.loading import load_model
from prism_ds.sudoku import mechanism
from prism_ds.sudoku.data import board_spec, eval_puzzles


def main() -> None:
    """Parse arguments, measure every step count and print (and optionally write) the tables."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="a PRISM fine-tune export, e.g. runs/sudoku-cpu/finetune/final")
    p.add_argument("--recipe", default=None, help="recipe name or YAML (default: the checkpoint's config.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. sampler.top_p=0.9")
    p.add_argument("--puzzles", type=int, default=500, help="the first N evaluation puzzles")
    p.add_argument("--steps", type=int, nargs="+", default=None, help="sampler steps N (default: sampler.steps)")
    p.add_argument("--policy", default="none", help="sampler row of the trajectories (default none: vanilla)")
    p.add_argument("--temperature", type=float, default=None, help="default: sampler.temperature")
    p.add_argument("--k", type=int, default=None, help="precision@K (default: sampler.remask_k)")
    p.add_argument("--seed", type=int, default=None, help="sampler seed (default: sampler.seed)")
    p.add_argument("--boot", type=int, default=1000, help="bootstrap resamples")
    p.add_argument("--out", default=None, help="write the markdown here and the JSON next to it (.json)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()

    cfg = load_config(args.recipe or str(Path(args.checkpoint) / "config.yaml"), args.overrides)
    use_cpu_kernels(cfg.cpu_kernels)  # the kernels the run's `prism-ds eval` samples with
    s = cfg.sampler
    if args.temperature is not None:
        s.temperature = args.temperature
    model, ckpt_cfg = load_model(args.checkpoint, args.device)
    spec = board_spec(cfg)
    if board_spec(ckpt_cfg) != spec:
        raise SystemExit(f"{args.checkpoint} was trained on {board_spec(ckpt_cfg).n}x{board_spec(ckpt_cfg).n} boards, "
                         f"the config asks for {spec.n}x{spec.n}")
    puzzles, path = eval_puzzles(cfg)
    text, results = mechanism.report(model, spec, puzzles[:args.puzzles].to(args.device), s, args.steps or s.steps,
                                     f" ({path}), checkpoint {args.checkpoint}", args.policy, args.seed, args.k,
                                     args.boot)
    print(text)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".md").write_text(text + "\n")
        out.with_suffix(".json").write_text(json.dumps(results, indent=1, allow_nan=False) + "\n")
        print(f"\nwrote {out.with_suffix('.md')} and {out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
