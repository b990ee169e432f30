"""GPU acceptance kit: the flagship's measurements, one after another, each under its own time cap.

    python eval/gpu/kit.py OUTDIR [--mode full|quick|cpu-smoke]      (eval/gpu/run.sh installs the wheels, then this)

Every step appends its figures to OUTDIR/gpu_kit.md as soon as it ends, so a step that fails or runs out of time
loses nothing already measured; the whole output of every command goes to OUTDIR/gpu_kit.log.
  0. environment: GPU, versions, the SDPA backends that run in bf16 at head dim 128 (env_report.py)
  1. eval/bench_llada.py: PRISM training steps of an 8B-shaped random LLaDA (LoRA r = 256, projection+linear head,
     ZeRO-3, bf16, seq 1024), micro batch 1 and 2, with and without activation checkpointing
  2. the user path on a ~1B random LLaDA folder: make-tiny-llada, `prism-ds train --stage finetune --recipe
     llada_8b`, load_model on the export, `code-eval generate` on 8 MBPP tasks (uncached; dual cache + threshold),
     `code-eval score`
  3. eval/bench_sampler.py at 8B shape (the authors' loop, prism-ds uncached / prefix / dual / dual + threshold)
  4. Sudoku 9x9 paper DiT: `prism-ds train` pretraining and PRISM fine-tuning steps/s at batch 256 (sudoku_9x9_gpu),
     and the recipe's projected time
  5. OWT DiT (768 x 12, L = 1024) with the attention+linear head: eval/bench_textgen.py --size owt
The caps sum to 7 minutes (--mode quick: 0-2, 4 minutes); --mode cpu-smoke runs every step at tiny sizes on CPU (CI).
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[2]
EVAL = REPO / "eval"
PY = sys.executable
DIST_VARS = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


@dataclass
class Step:
    """One measurement: commands run in order (the first failure ends the step) under one time cap."""

    title: str
    cap_s: float
    commands: list[list[str]]
    report: Callable[[list[str]], str] = field(default=lambda outputs: "\n".join(outputs))


def _cli(*args: str) -> list[str]:
    return [PY, "-m", "prism_ds.cli", *args]


def _markdown_lines(text: str) -> str:
    """The lines of a benchmark's output that are its report (tables and headings), without progress noise."""
    keep = [line for line in text.splitlines() if line.startswith(("|", "LLaDA", "N =", "PRISM", "prism-ds", "bench_",
                                                                    "- ", "#"))]
    out: list[str] = []
    for line in keep:  # a table needs a blank line before it to render as one
        if out and line.startswith("|") != out[-1].startswith("|"):
            out.append("")
        out.append(line)
    return "\n".join(out)


def _tb_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series of a TensorBoard folder."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def sudoku_report(run_dir: Path, recipe: str, micro_batch: int) -> Callable[[list[str]], str]:
    """Steps/s of each stage from its TensorBoard throughput (windows after the first) and the recipe's time."""

    def report(_outputs: list[str]) -> str:
        from prism_ds.config import load_config

        cfg, ran = load_config(recipe), load_config(str(run_dir / "pretrain" / "config.yaml"))
        m = ran.model
        side = ran.data.box_rows * ran.data.box_cols
        lines = [f"DiT hidden {m.hidden}, {m.n_blocks} blocks, {m.n_heads} heads, {side}x{side} boards; `{recipe}` "
                 "recipe steps\n",
                 "| stage | steps/s (batch %d) | peak memory (GiB) | recipe steps | projected hours |" % micro_batch,
                 "|---|---|---|---|---|"]
        total_h = 0.0
        for stage in ("pretrain", "finetune"):
            scalars = _tb_scalars(run_dir / stage / "tb")
            windows = [v for _, v in scalars.get("throughput/samples_per_s", [])][1:]  # the first holds warm-up
            if not windows:
                lines.append(f"| {stage} | no throughput logged | - | - | - |")
                continue
            steps_per_s = sorted(windows)[len(windows) // 2] / micro_batch
            peak = max((v for _, v in scalars.get("memory/peak_gib", [])), default=None)
            recipe_steps = getattr(cfg, stage).steps
            hours = recipe_steps / steps_per_s / 3600
            total_h += hours
            lines.append(f"| {stage} | {steps_per_s:.2f} | {'-' if peak is None else f'{peak:.1f}'} | "
                         f"{recipe_steps} | {hours:.1f} |")
        lines.append(f"\n`{recipe}` projected: {total_h:.1f} h for both stages on this device (one process).")
        return "\n".join(lines)

    return report


def steps(mode: str, work: Path, mbpp_file: Path) -> list[Step]:
    """The kit's steps at the sizes of `mode`."""
    gpu = mode != "cpu-smoke"
    llada = work / "llada"
    run = work / "run"
    export = run / "finetune" / "final"
    mbpp = [f"codeeval.mbpp_path={mbpp_file}", "codeeval.tasks=11-18"]
    if gpu:  # the flagship's shapes and the recipe's own sampler (canvas 1024, 256 steps, K_block 4)
        bench_llada = ["--size", "8b", "--seq", "1024", "--micro-batch", *(["1"] if mode == "quick" else ["1", "2"]),
                       "--checkpointing", "both", "--steps", "3", "--warmup", "1"]
        tiny = ["--size", "2048,12,16,5632", "--dtype", "bfloat16"]  # ~1.1B parameters, LLaDA's vocabulary
        train = ["finetune.steps=4"]
        sampler: list[str] = []
        bench_sampler = ["--size", "8b", "--steps", "256", "--repeats", "1", "--sharpen", "100"]
        sudoku = ["data.n_train=2048", "pretrain.steps=60", "finetune.steps=40", "pretrain.log_every=20",
                  "finetune.log_every=20"]
        sudoku_mb = 256
        textgen = ["--size", "owt", "--train-batch", "16", "--batch", "8", "--steps", "64", "--repeats", "1"]
    else:  # every path at a size 2 CPU cores run in seconds; bf16 where the GPU runs bf16
        bench_llada = ["--size", "tiny", "--seq", "64", "--micro-batch", "1", "2", "--checkpointing", "both",
                       "--steps", "1", "--warmup", "1"]
        tiny = ["--dtype", "bfloat16"]  # the 64-wide default size, its files in bf16 as on the GPU
        train = ["finetune.steps=2", "text.max_length=128", "lora.r=8", "lora.alpha=8", "model.dtype=bfloat16"]
        sampler = ["sampler.canvas=0", "sampler.gen_length=32", "sampler.block_length=16", "sampler.steps=8",
                   "sampler.k_block=1"]
        bench_sampler = ["--size", "small", "--steps", "48", "--canvas", "192", "--prompt", "64", "--repeats", "1",
                         "--sharpen", "100"]
        sudoku = ["data.n_train=256", "pretrain.steps=4", "finetune.steps=4", "pretrain.log_every=2",
                  "finetune.log_every=2", "model.hidden=64", "model.n_blocks=2", "model.n_heads=4",
                  "pretrain.micro_batch_size=16", "finetune.micro_batch_size=16"]
        sudoku_mb = 16
        textgen = ["--size", "small", "--train-batch", "4", "--batch", "2", "--steps", "8", "--repeats", "1",
                   "--train-steps", "1"]
    text = [f"run_dir={run}", f"model.path={llada / 'model'}", f"text.source={llada / 'data' / 'train.jsonl'}",
            f"text.heldout_source={llada / 'data' / 'heldout.jsonl'}", "text.prompt_field=instruction",
            "text.solution_field=output", "text.prompt_format=auto", "text.shuffle_buffer=0", "finetune.grad_accum=1",
            "finetune.log_every=1", "finetune.calib_every=2", "finetune.ckpt_every=1000", *train]
    generate = ["code-eval", "generate", "--benchmark", "mbpp", "--model", str(export), "--recipe", "llada_8b",
                "text.prompt_format=auto", *mbpp, *sampler]  # prompts as trained (the code pairs have no entry point)
    sudoku_run = work / "sudoku"
    sudoku_common = ["--recipe", "sudoku_9x9_gpu", f"run_dir={sudoku_run}", "pretrain.ckpt_every=100000",
                     "finetune.ckpt_every=100000", "pretrain.warmup_steps=10", "finetune.warmup_steps=10", *sudoku]
    all_steps = [
        Step("0. Environment", 20, [[PY, str(EVAL / "gpu" / "env_report.py")]], lambda out: out[0].strip()),
        Step("1. LLaDA-8B PRISM training step (eval/bench_llada.py)", 100,
             [[PY, str(EVAL / "bench_llada.py"), *bench_llada]], lambda out: _markdown_lines(out[0])),
        Step("2. The user path on a ~1B random LLaDA (train, export, load_model, code-eval)", 120, [
            _cli("make-tiny-llada", "--out", str(llada), *tiny),
            _cli("train", "--stage", "finetune", "--recipe", "llada_8b", "--no-progress", *text),
            [PY, str(EVAL / "gpu" / "check_export.py"), str(export)],
            _cli(*generate, "--out", str(work / "uncached.jsonl"), "--no-progress"),
            _cli(*generate, "--out", str(work / "dual.jsonl"), "--no-progress", "sampler.cache=dual",
                 "sampler.threshold=0.9"),
            _cli("code-eval", "score", "--benchmark", "mbpp", "--samples", str(work / "uncached.jsonl"), "--samples",
                 str(work / "dual.jsonl"), "--no-progress", *mbpp[:1]),
        ], lambda out: _markdown_lines("\n".join(out))),
    ]
    if mode == "quick":
        return all_steps
    return all_steps + [
        Step("3. Blockwise sampler at 8B shape (eval/bench_sampler.py)", 70,
             [[PY, str(EVAL / "bench_sampler.py"), *bench_sampler]], lambda out: _markdown_lines(out[0])),
        Step("4. Sudoku 9x9 paper DiT (prism-ds train, sudoku_9x9_gpu)", 60, [
            _cli("train", "--stage", "pretrain", "--no-progress", *sudoku_common),
            _cli("train", "--stage", "finetune", "--no-progress", *sudoku_common),
        ], sudoku_report(sudoku_run, "sudoku_9x9_gpu", sudoku_mb)),
        Step("5. OWT DiT with the attention+linear head (eval/bench_textgen.py)", 50,
             [[PY, str(EVAL / "bench_textgen.py"), *textgen, "--out", str(work / "bench_textgen")]],
             lambda out: _markdown_lines(out[0])),
    ]


def _short(cmd: list[str]) -> str:
    """A command as the report names it: the script or CLI verb, its stage/size/output and cache choice."""
    words = [w for w in cmd[1:] if w not in ("-m", "prism_ds.cli")]
    named = [Path(words[i + 1]).name for i, w in enumerate(words[:-1]) if w in ("--stage", "--size", "--out")]
    return " ".join([Path(words[0]).name, *words[1:2 if not words[1:2] or not words[1].startswith("-") else 1],
                     *named, *(w for w in words if w.startswith("sampler.cache="))])


def run_step(step: Step, log, env: dict) -> tuple[str, list[str]]:
    """Run a step's commands under its cap; (status line with each command's wall time, stdout of each that ran)."""
    start, outputs, times = time.perf_counter(), [], []
    for cmd in step.commands:
        began = time.perf_counter()
        left = step.cap_s - (began - start)
        log.write(f"\n$ {' '.join(cmd)}\n")
        log.flush()
        # A new session per command, so a cap stops its whole process tree (DeepSpeed, sandboxed programs).
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True, cwd=REPO, env=env,
                                start_new_session=True)
        try:
            out, _ = proc.communicate(timeout=max(left, 1))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
            log.write(out)
            outputs.append(out)
            return f"**timed out** after the step's cap of {step.cap_s:.0f} s, in `{_short(cmd)}`", outputs
        log.write(out)
        outputs.append(out)
        times.append(f"`{_short(cmd)}` {time.perf_counter() - began:.1f} s")
        if proc.returncode != 0:
            return (f"**failed** (exit {proc.returncode}) after {time.perf_counter() - start:.0f} s in "
                    f"`{_short(cmd)}`; see gpu_kit.log"), outputs
    return f"ok in {time.perf_counter() - start:.0f} s (cap {step.cap_s:.0f} s): " + ", ".join(times), outputs


def main() -> int:
    """Run every step of the mode; exit 1 if any failed (their figures are in the report all the same)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("outdir", type=Path)
    p.add_argument("--mode", choices=["full", "quick", "cpu-smoke"], default="full")
    p.add_argument("--work", type=Path, help="scratch folder for models and runs, kept (default: a fresh temporary "
                   "folder, removed at the end: every run trains from scratch)")
    p.add_argument("--mbpp", type=Path, help="mbpp.jsonl (default: the one prepare.sh carried in .gpu/data, else "
                   "../shared/data/mbpp/mbpp.jsonl beside the checkout)")
    args = p.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="prism-gpu-kit-"))
    args.outdir.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    report, log_path = args.outdir / "gpu_kit.md", args.outdir / "gpu_kit.log"
    # Each command is a job of its own: a process group's address inherited from the caller (a test process that
    # already initialised torch.distributed holds its MASTER_PORT) would make every step's rendezvous collide.
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS} | {"PYTHONUNBUFFERED": "1"}
    if args.mode == "cpu-smoke":
        env["DS_ACCELERATOR"] = "cpu"
    report.write_text(f"# prism-ds GPU kit ({args.mode}), {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n")
    # CPU caps are looser: CI shares 2 cores with other jobs, and the smoke run checks that every path works, not speed.
    stretch = 4.0 if args.mode == "cpu-smoke" else 1.0
    failed, t0 = 0, time.perf_counter()
    with open(log_path, "w") as log:
        carried = REPO / ".gpu" / "data" / "mbpp.jsonl"
        mbpp = args.mbpp or (carried if carried.exists() else REPO.parent / "shared" / "data" / "mbpp" / "mbpp.jsonl")
        for step in steps(args.mode, work, mbpp):
            step.cap_s *= stretch
            print(f"[gpu kit] {step.title} (cap {step.cap_s:.0f} s)", flush=True)
            status, outputs = run_step(step, log, env)
            try:
                figures = step.report(outputs) if outputs else ""
            except Exception as e:  # a report that cannot be read is a failure of the step, not of the kit
                figures, status = "", f"{status}; report unreadable: {e!r}"
            failed += not status.startswith("ok")
            with open(report, "a") as md:
                md.write(f"\n## {step.title}\n\n{status}\n\n{figures}\n")
            print(f"[gpu kit]   {status}", flush=True)
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    print(f"[gpu kit] {failed} step(s) failed; {time.perf_counter() - t0:.0f} s; report: {report}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
