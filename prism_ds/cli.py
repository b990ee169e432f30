"""`prism-ds` command line: train, sample, eval, demo, code-eval, text-eval, gen-sudoku, make-tiny-llada.

Every subcommand takes --recipe (a shipped recipe name or a YAML path) and trailing dotted
overrides such as `model.hidden=256 finetune.steps=500`.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from prism_ds.codeeval.generate import generate
from prism_ds.codeeval.score import score, table
from prism_ds.codeeval.sweep import sweep
from prism_ds.config import ConfigError, load_config
from prism_ds.demo import run_demo
from prism_ds.engine import distributed as dist_utils
from prism_ds.engine.cpu_kernels import use_cpu_kernels
from prism_ds.engine.trainer import train
from prism_ds.models.critic import critic_for
from prism_ds.models.loading import load_model
from prism_ds.models.tiny_llada import jsonl_corpus, write_code_pairs, write_tiny_llada
from prism_ds.sudoku.board import BoardSpec, is_solved, read_csv, write_csv
from prism_ds.sudoku.data import board_spec
from prism_ds.sudoku.evaluate import evaluate_checkpoint, solve
from prism_ds.sudoku.generator import make_puzzles, random_solutions
from prism_ds.textgen.demo import run_text_demo
from prism_ds.textgen.generate import text_table


def _add_config_args(p: argparse.ArgumentParser, default_recipe: str | None = "sudoku_cpu") -> None:
    p.add_argument("--recipe", default=default_recipe, help="recipe name in prism_ds/recipes or a YAML path "
                                                            f"(default: {default_recipe})")
    p.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. model.hidden=256")
    p.add_argument("--no-progress", action="store_true", help="hide tqdm progress bars")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with one sub-parser per command."""
    parser = argparse.ArgumentParser(prog="prism-ds", description="PRISM self-correcting masked diffusion on DeepSpeed")
    # The deepspeed launcher passes --local_rank=N before the subcommand (LOCAL_RANK is also in the env).
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="run one training stage (pretrain = MDM loss, finetune = PRISM loss, critic = "
                                     "the Token-Critic baseline's critic against the frozen finetune export)")
    p.add_argument("--stage", choices=["pretrain", "finetune", "critic"], required=True)
    p.add_argument("--overwrite", action="store_true", help="train the stage again even if it finished with "
                                                            "another config")
    _add_config_args(p)

    p = sub.add_parser("sample", help="solve puzzles from a CSV with a checkpoint and one remask policy")
    p.add_argument("--checkpoint", required=True, help="checkpoint directory (e.g. runs/sudoku/finetune/final)")
    p.add_argument("--puzzles", required=True, help="CSV of puzzles in the paper's format (0 = blank)")
    p.add_argument("--out", required=True, help="CSV to write the filled boards to")
    p.add_argument("--steps", type=int, required=True, help="number of sampler steps (forward passes)")
    p.add_argument("--policy", default="prism", help="remask policy: none, prism, remdm, remdm-conf, token-critic "
                                                     "(reads sampler.critic), optionally with a count rule, e.g. "
                                                     "remdm:binomial (ReMDM-cap)")
    _add_config_args(p, default_recipe=None)

    p = sub.add_parser("eval", help="success table (steps x policy) of a checkpoint on the run's puzzles")
    p.add_argument("--checkpoint", required=True)
    _add_config_args(p)

    p = sub.add_parser("demo", help="generate data, pretrain, PRISM fine-tune, evaluate (the CPU Sudoku demo; "
                                    "--recipe text_cpu: the CPU text recipe)")
    p.add_argument("--overwrite", action="store_true", help="train both stages again even if they finished")
    _add_config_args(p)

    p = sub.add_parser("make-tiny-llada", help="write a tiny random LLaDA folder (official layout and special "
                                                 "tokens) and code pairs for CPU smoke runs")
    p.add_argument("--out", default="runs/llada-tiny", help="writes OUT/model and OUT/data/{train,heldout}.jsonl")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compact", action="store_true", help="a small vocabulary (BPE + specials) instead of LLaDA's "
                                                          "126464 rows: for models trained from scratch on CPU")
    p.add_argument("--corpus", help="JSONL whose string fields train the BPE (default: Python's standard library)")
    p.add_argument("--size", default="64,2,4,128", help="d_model,layers,heads,mlp_hidden (default 64,2,4,128)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="weights on disk (bfloat16 halves a large random model's files, as LLaDA's own)")

    p = sub.add_parser("code-eval", help="code benchmarks (MBPP, MBPP+, HumanEval, HumanEval+): generate, score, "
                                           "sweep K_block")
    p.add_argument("action", choices=["generate", "score", "sweep"])
    p.add_argument("--benchmark", required=True, help="mbpp | mbpp+ | humaneval | humaneval+")
    p.add_argument("--model", help="export or pretrained folder (generate, sweep)")
    p.add_argument("--out", help="samples JSONL to write or complete (generate); directory (sweep)")
    p.add_argument("--samples", action="append", help="samples JSONL to score (repeat the flag: one table row each)")
    p.add_argument("--k-blocks", default="4,6", help="sweep: K_block values, comma-separated")
    _add_config_args(p, default_recipe="llada_8b")

    p = sub.add_parser("text-eval", help="unconditional text generation: sample every (policy row, N) cell, score "
                                         "MAUVE / gen-PPL / entropy, print the paper's Table 2 layout")
    p.add_argument("--model", help="export or MDLM folder/.ckpt (default: <run_dir>/finetune/final)")
    _add_config_args(p, default_recipe="owt_gpu")

    p = sub.add_parser("gen-sudoku", help="write solved boards or unique-solution puzzles as CSV")
    p.add_argument("--box-rows", type=int, default=3)
    p.add_argument("--box-cols", type=int, default=3)
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--blanks", type=int, default=0, help="0 writes solved boards; >0 writes puzzles")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    return parser


def _run(args: argparse.Namespace) -> None:
    progress = not getattr(args, "no_progress", False)
    if args.command == "gen-sudoku":
        spec = BoardSpec(args.box_rows, args.box_cols)
        boards = (make_puzzles(spec, args.count, args.blanks, args.seed) if args.blanks
                  else random_solutions(spec, args.count, args.seed))
        write_csv(args.out, boards)
        print(f"wrote {len(boards)} boards to {args.out}")
        return
    if args.command == "make-tiny-llada":
        try:
            d, layers, heads, mlp = (int(v) for v in args.size.split(","))
        except ValueError:
            raise ValueError(f"--size {args.size!r}: expected d_model,layers,heads,mlp_hidden") from None
        model = write_tiny_llada(Path(args.out) / "model", seed=args.seed, d_model=d, n_layers=layers, n_heads=heads,
                                 mlp_hidden_size=mlp, compact=args.compact,
                                 corpus=jsonl_corpus(args.corpus) if args.corpus else None,
                                 dtype=args.dtype)
        pairs, held = write_code_pairs(Path(args.out) / "data")
        print(f"wrote a tiny random LLaDA to {model} and code pairs to {pairs}, {held}")
        return
    if args.command == "sample":
        _sample(args, progress)
        return
    if args.command == "code-eval":
        _code_eval(args, progress)
        return
    cfg = load_config(args.recipe, args.overrides)
    use_cpu_kernels(cfg.cpu_kernels)  # before the first tensor operation: torch and MKL read it once
    if args.command == "train":
        final = train(cfg, args.stage, progress, args.overwrite)
        if dist_utils.rank() == 0:
            print(f"[prism-ds] {args.stage} finished: {final}")
    elif args.command == "eval":
        print(evaluate_checkpoint(args.checkpoint, cfg, progress))
    elif args.command == "demo":
        if cfg.task == "packed_text":
            print(run_text_demo(cfg, progress, args.overwrite))
        else:
            print(run_demo(cfg, progress, args.overwrite))
    elif args.command == "text-eval":
        print(text_table(cfg, args.model or Path(cfg.run_dir) / "finetune" / "final", progress))


def _sample(args: argparse.Namespace, progress: bool) -> None:
    device = dist_utils.device()
    model, ckpt_cfg = load_model(args.checkpoint, device)
    # Sampler settings: --recipe if given, else the checkpoint's run config; then the overrides.
    cfg = load_config(args.recipe or str(Path(args.checkpoint) / "config.yaml"), args.overrides)
    sampler = cfg.sampler
    critic, _ = critic_for([args.policy], sampler, cfg.run_dir, device, args.checkpoint)  # token-critic only
    spec = board_spec(ckpt_cfg)
    puzzles = read_csv(args.puzzles, spec)
    filled = solve(model, spec, puzzles.to(device), args.steps, args.policy, sampler, progress=progress,
                   critic=critic).cpu()
    write_csv(args.out, filled)
    ok = is_solved(spec, filled, puzzles).float().mean().item()
    print(f"wrote {len(filled)} boards to {args.out}; solved {100 * ok:.1f}%")


def _code_eval(args: argparse.Namespace, progress: bool) -> None:
    cfg = load_config(args.recipe, args.overrides)
    need = {"generate": ("model", "out"), "score": ("samples",), "sweep": ("model", "out")}[args.action]
    missing = [f"--{n}" for n in need if not getattr(args, n)]
    if missing:
        raise ValueError(f"code-eval {args.action} needs {' and '.join(missing)}")
    if args.action == "score":
        reports = [score(args.benchmark, s, cfg, progress) for s in args.samples]
        print(table(reports))
        return
    if "RANK" in os.environ:  # started by deepspeed / torchrun: generation is spread over the ranks
        dist_utils.init_distributed()
    if args.action == "generate":
        out = generate(args.benchmark, args.model, cfg, args.out, progress)
        if dist_utils.rank() == 0:
            print(f"wrote {out}; score it with: prism-ds code-eval score --benchmark {args.benchmark} --samples {out}")
        return
    try:
        k_blocks = [int(k) for k in args.k_blocks.split(",")]
    except ValueError:
        raise ValueError(f"--k-blocks {args.k_blocks!r}: expected comma-separated integers") from None
    report = sweep(args.benchmark, args.model, cfg, k_blocks, args.out, progress)
    if report:
        print(report)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse flags and dotted overrides in any order (`train run_dir=X --no-progress model.hidden=64`)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse's intermixed parsing does not support sub-commands, so overrides that follow a flag come
    # back as unknown arguments: accept those of the form key=value, reject anything else as argparse would.
    bad = [a for a in extra if a.startswith("-") or "=" not in a or not hasattr(args, "overrides")]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    return args


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `prism-ds` command."""
    args = parse_args(argv)
    try:
        _run(args)
    except (ConfigError, ValueError, FileNotFoundError) as exc:
        print(f"prism-ds: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        print(f"prism-ds: {exc or 'interrupted'}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
