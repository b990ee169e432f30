"""OpenWebText-path benchmark, side by side in one run on the same random-weight DiT + attention+linear head:

1. sampler tokens/s of vanilla MDLM sampling, PRISM (Algorithm 2) and PRISM-loop at equal N: PRISM's head is one
   more DiT block per pass (its overhead is what this measures; the loop adds none per pass);
2. training steps/s of a PRISM fine-tuning step (z pass + n_y y passes through backbone and head) vs a
   pretraining (MDM-only) step, forward + backward + AdamW, plain PyTorch.

    .venv/bin/python eval/bench_textgen.py                      # CPU: a small DiT at L = 128
    .venv/bin/python eval/bench_textgen.py --size owt           # GPU: MDLM-OWT's shape (170M, L = 1024), bf16

Timings interleave the variants and keep each one's best of --repeats. Prints a table and writes it to
runs/bench_textgen/results.json and TensorBoard (runs/bench_textgen/tb).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from tqdm import tqdm

from prism_ds.config import ModelConfig, QualityHeadConfig, load_config
from prism_ds.core.objective import compute_losses
from prism_ds.models.prism_model import build_model
from prism_ds.textgen.generate import generate_batch

SIZES = {  # hidden, blocks, heads, cond_dim, vocab, length
    "small": (128, 4, 4, 64, 2048, 128),
    "owt": (768, 12, 12, 128, 50258, 1024),
}
ROWS = ("none", "prism:binomial", "prism:binomial/loop")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _model(size: str, device: torch.device, dtype: torch.dtype):
    hidden, blocks, heads, cond, vocab, length = SIZES[size]
    mcfg = ModelConfig(hidden=hidden, n_blocks=blocks, n_heads=heads, cond_dim=cond, dropout=0.0,
                       attention="flash" if device.type == "cuda" else "sdpa")
    torch.manual_seed(0)
    model = build_model(mcfg, QualityHeadConfig(kind="attention+linear"), vocab, True, mask_id=vocab - 1)
    with torch.no_grad():  # random adaLN/output weights so every path does real work (zero-init would not)
        for name, p in model.named_parameters():
            if "adaLN" in name or "linear" in name:
                p.normal_(0, 0.02)
    return model.to(device=device, dtype=dtype), vocab, length


def bench_sampler(model, vocab: int, length: int, args, cfg, device) -> dict:
    """Best-of-repeats seconds per batch of each row at N steps, interleaved."""
    best = {row: float("inf") for row in ROWS}
    allowed = torch.ones(vocab, dtype=torch.bool, device=device)
    allowed[vocab - 1] = False
    for rep in tqdm(range(args.repeats + 1), desc="sampler"):  # repeat 0 warms up
        for row in ROWS:
            gen = torch.Generator(device=device).manual_seed(rep)
            _sync(device)
            t0 = time.perf_counter()
            generate_batch(model, args.batch, length, vocab - 1, row, args.steps, cfg, gen, allowed)
            _sync(device)
            if rep:
                best[row] = min(best[row], time.perf_counter() - t0)
    return {row: {"seconds": t, "tokens_per_s": args.batch * length / t} for row, t in best.items()}


def bench_training(model, vocab: int, length: int, args, cfg, device) -> dict:
    """Best-of-repeats seconds of a pretraining step and of a PRISM step on the same batches."""
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randint(0, vocab - 1, (args.train_batch, length), device=device)
    fixed = torch.zeros_like(x, dtype=torch.bool)
    best = {"pretrain": float("inf"), "prism": float("inf")}
    peak = {mode: 0.0 for mode in best}  # GiB allocated at most during the mode's steps (CUDA only)
    for rep in tqdm(range(args.repeats + 1), desc="training"):
        for mode in best:
            _sync(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            for _ in range(args.train_steps):
                losses = compute_losses(model, x, fixed, vocab - 1, mode, cfg.masking, cfg.prism, generator=gen)
                losses.total.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            _sync(device)
            if rep:
                best[mode] = min(best[mode], (time.perf_counter() - t0) / args.train_steps)
            if device.type == "cuda":
                peak[mode] = max(peak[mode], torch.cuda.max_memory_allocated() / 2**30)
    model.eval()
    return {mode: {"seconds_per_step": t, "steps_per_s": 1 / t, "peak_gib": peak[mode]} for mode, t in best.items()}


def main() -> None:
    """Run both benchmarks and print the table."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", choices=sorted(SIZES), default="small")
    p.add_argument("--steps", type=int, default=64, help="sampler steps N (the same for every row)")
    p.add_argument("--batch", type=int, default=8, help="sequences per sampler batch")
    p.add_argument("--train-batch", type=int, default=8)
    p.add_argument("--train-steps", type=int, default=3, help="steps per timed training repeat")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="runs/bench_textgen")
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = load_config("owt_gpu")  # Algorithm 2 / PRISM-loop settings and the OWT fine-tuning recipe (k, n_y, lambda)
    model, vocab, length = _model(args.size, device, dtype)
    model.eval()
    sampler = bench_sampler(model, vocab, length, args, cfg, device)
    training = bench_training(model, vocab, length, args, cfg, device)
    base = sampler["none"]["seconds"]
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    lines = [f"bench_textgen --size {args.size} ({name}, {dtype}, L = {length}, N = {args.steps}, batch {args.batch})",
             "", "| sampler row | tokens/s | time vs vanilla |", "|---|---|---|"]
    for row, r in sampler.items():
        lines.append(f"| {row} | {r['tokens_per_s']:.1f} | {r['seconds'] / base:.3f}x |")
    pre, prism = training["pretrain"]["seconds_per_step"], training["prism"]["seconds_per_step"]
    mem = {m: f"{r['peak_gib']:.1f}" if device.type == "cuda" else "-" for m, r in training.items()}
    lines += ["", f"| training step (batch {args.train_batch}, plain AdamW) | steps/s | time vs pretraining | "
              f"peak memory (GiB) |", "|---|---|---|---|",
              f"| pretrain (MDM only) | {1 / pre:.2f} | 1.000x | {mem['pretrain']} |",
              f"| PRISM (k = {cfg.prism.k}, n_y = {cfg.prism.n_y}) | {1 / prism:.2f} | {prism / pre:.3f}x | "
              f"{mem['prism']} |"]
    report = "\n".join(lines)
    print(report)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"args": vars(args), "device": name, "sampler": sampler,
                                                  "training": training}, indent=1))
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(out / "tb")) as w:
        for row, r in sampler.items():
            w.add_scalar(f"sampler/{row}/tokens_per_s", r["tokens_per_s"], args.steps)
        for mode, r in training.items():
            w.add_scalar(f"training/{mode}/steps_per_s", r["steps_per_s"], 0)
        w.add_text("report", report)


if __name__ == "__main__":
    main()
