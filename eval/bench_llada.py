"""LLaDA PRISM training-step benchmark: tokens/s, peak memory and MFU of the flagship configuration.

Builds an LLaDA with random weights (8B-shaped by default on a GPU; `--size tiny` on CPU, which CI runs),
adds LoRA on q/k/v and the projection+linear head, wraps it in DeepSpeed exactly as training does, and
times PRISM steps (two backbone passes with gradients: z with logits, y without) on random sequences
whose first quarter is a fixed prompt.

    .venv/bin/python eval/bench_llada.py [--size 8b|tiny] [--seq 1024] [--micro-batch 1 2] [--steps 10]
        [--ds-config zero3.json] [--checkpointing off|on|both] [--lora-r 256]

Prints a Markdown table, one row per (micro batch, checkpointing) setting, all on one engine.

MFU counts matmul FLOPs only: per token and pass 2x the parameters it multiplies forward, as much again
for activation gradients (LoRA sends gradients through every layer) and 2x the trainable parameters
for weight gradients; the y pass skips the vocabulary projection; attention adds 4 * L * d per layer
forward and twice that backward; the embedding lookup is free. Peak: 989 bf16 TFLOP/s (H100/H200 SXM,
dense) unless --peak-tflops is given.
"""
from __future__ import annotations

import argparse
import os
import time

if not __import__("torch").cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from prism_ds.config import LoraConfig, MaskingConfig, PrismConfig, StageConfig  # noqa: E402
from prism_ds.core.objective import compute_losses  # noqa: E402
from prism_ds.engine import distributed as dist_utils  # noqa: E402
from prism_ds.engine.optim import build_optimizer  # noqa: E402
from prism_ds.models.backbone import HFBackbone  # noqa: E402
from prism_ds.models.llada import LLaDAConfig, LLaDAModelLM  # noqa: E402
from prism_ds.models.loading import add_lora  # noqa: E402
from prism_ds.models.prism_model import PrismModel  # noqa: E402
from prism_ds.models.quality_heads import build_quality_head  # noqa: E402

SIZES = {"8b": dict(d_model=4096, n_layers=32, n_heads=32, mlp_hidden_size=12288),
         "tiny": dict(d_model=64, n_layers=2, n_heads=4, mlp_hidden_size=128)}


def step_flops(cfg: LLaDAConfig, n_trainable: int, tokens: int, seq: int) -> float:
    """Matmul FLOPs of one PRISM step over `tokens` sequence tokens (see the module docstring)."""
    d, V, kv = cfg.d_model, cfg.padded_vocab_size, cfg.d_model * cfg.n_kv_heads // cfg.n_heads
    body = cfg.n_layers * (2 * d * d + 2 * d * kv + 3 * d * cfg.mlp_hidden_size)  # q, attn_out; k, v; SwiGLU
    attention = 4 * seq * d * cfg.n_layers  # QK^T and AV per token, forward
    per_pass = lambda matmul: 2 * matmul + 2 * matmul + 3 * attention  # noqa: E731 - fwd, act-grad, attn fwd+bwd
    z_pass, y_pass = per_pass(body + V * d), per_pass(body)
    return tokens * (z_pass + y_pass + 2 * 2 * n_trainable)  # weight gradients in both passes


def main() -> None:
    """Parse arguments, build the model once, time every (micro batch, checkpointing) row, print a table."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", choices=sorted(SIZES), default="8b" if torch.cuda.is_available() else "tiny")
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--micro-batch", type=int, nargs="+", default=[1], help="one row per value (same engine)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--lora-r", type=int, default=256)
    p.add_argument("--ds-config", default="zero3.json")
    p.add_argument("--checkpointing", choices=["off", "on", "both"], default="off",
                   help="activation checkpointing per block (both: a row with and one without)")
    p.add_argument("--peak-tflops", type=float, default=989.0)
    args = p.parse_args()
    if args.size == "8b" and not torch.cuda.is_available():
        raise SystemExit("--size 8b needs a GPU (use --size tiny on CPU)")

    dist_utils.init_distributed()
    device = dist_utils.device()
    stage = StageConfig(micro_batch_size=args.micro_batch[0], lr=1e-4, head_lr=0.0, weight_decay=0.1,
                        ds_config=args.ds_config)
    ds_config = dist_utils.build_ds_config(stage, "finetune", dist_utils.world_size())
    dtype = torch.bfloat16 if ds_config.get("bf16", {}).get("enabled") else torch.float32
    cfg = LLaDAConfig(**SIZES[args.size], n_kv_heads=None, vocab_size=126464, embedding_size=126464,
                      mask_token_id=126336)
    torch.manual_seed(0)
    with torch.device(device):
        base = LLaDAModelLM(cfg).to(dtype)
    lora = LoraConfig(r=args.lora_r, alpha=args.lora_r, dropout=0.1)
    model = PrismModel(HFBackbone(add_lora(base, lora)), build_quality_head("projection+linear", cfg.d_model, None))
    model.quality_head.to(device=device, dtype=dtype)
    import deepspeed

    # One engine for every row: the micro batch only sets the batch fed to it, and checkpointing is a module flag,
    # so the 8B model is built and partitioned once (most of a row's cost on a GPU otherwise).
    engine, *_ = deepspeed.initialize(model=model, optimizer=build_optimizer(model, stage, ds_config),
                                      config=ds_config)
    n_params = sum(getattr(q, "ds_numel", q.numel()) for q in model.parameters())
    n_trainable = sum(getattr(q, "ds_numel", q.numel()) for q in model.parameters() if q.requires_grad)
    gen = torch.Generator(device=device).manual_seed(0)
    prism = PrismConfig(k=8, y_positions="confidence", y_window=512, temperature=0.0, lam=0.5)
    on_gpu = torch.cuda.is_available()
    device_name = torch.cuda.get_device_name() if on_gpu else "CPU"
    print(f"LLaDA {args.size} ({n_params / 1e9:.3f}B params, {n_trainable / 1e6:.1f}M trainable: LoRA r={args.lora_r} "
          f"on q/k/v + projection+linear head), {args.ds_config}, {dtype}, seq {args.seq}, {dist_utils.world_size()} "
          f"rank(s), {device_name}; {args.steps} timed steps after {args.warmup} warm-up\n")
    print("| micro batch | act. checkpointing | step time (s) | sequence tokens/s | MFU | peak memory (GiB) | "
          "estimate (GiB, eval/llada_memory.py) |")
    print("|---|---|---|---|---|---|---|")
    checkpointing = {"off": [False], "on": [True], "both": [False, True]}[args.checkpointing]
    for ckpt in checkpointing:
        if ckpt:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            base.gradient_checkpointing_disable()
        for mb in args.micro_batch:
            print(_row(engine, cfg, args, mb, ckpt, n_trainable, gen, prism, device), flush=True)


def _row(engine, cfg, args, mb: int, ckpt: bool, n_trainable: int, gen, prism, device) -> str:
    """Time one (micro batch, checkpointing) setting; a row of the table (OOM is a row too)."""
    x = torch.randint(0, 126080, (mb, args.seq), device=device, generator=gen)
    fixed = torch.zeros_like(x, dtype=torch.bool)
    fixed[:, :args.seq // 4] = True  # the prompt

    def step() -> None:
        losses = compute_losses(engine, x, fixed, 126336, "prism", MaskingConfig(), prism, generator=gen,
                                lengths=(~fixed).sum(1).float())
        engine.backward(losses.total)
        engine.step()

    on_gpu = torch.cuda.is_available()
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    label = f"| {mb} | {'on' if ckpt else 'off'} |"
    try:
        if on_gpu:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        for _ in tqdm(range(args.warmup), desc=f"warmup mb {mb} ckpt {ckpt}", leave=False):
            step()
        sync()
        t0 = time.perf_counter()
        for _ in tqdm(range(args.steps), desc=f"timed mb {mb} ckpt {ckpt}", leave=False):
            step()
        sync()
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return f"{label} out of memory | - | - | - | {_estimate(args, mb, ckpt)} |"
    elapsed = time.perf_counter() - t0
    tokens = args.steps * mb * args.seq * dist_utils.world_size()
    flops = step_flops(cfg, n_trainable, tokens, args.seq)
    mfu = f"{flops / elapsed / (args.peak_tflops * 1e12 * dist_utils.world_size()):.1%}" if on_gpu else \
        f"({flops / elapsed / 1e9:.2f} GFLOP/s)"
    peak = f"{torch.cuda.max_memory_allocated() / 2**30:.1f}" if on_gpu else "-"
    estimate = _estimate(args, mb, ckpt)
    return f"{label} {elapsed / args.steps:.3f} | {tokens / elapsed:,.0f} | {mfu} | {peak} | {estimate} |"


def _estimate(args, mb: int, ckpt: bool) -> str:
    """docs/llada.md's memory estimate for this row (8B shape only: the estimate knows LLaDA-8B's sizes)."""
    if args.size != "8b":
        return "-"
    from llada_memory import estimated_total  # eval/ is this script's folder, so it is on sys.path

    return f"{estimated_total(dist_utils.world_size(), mb, args.seq, 1, args.lora_r, ckpt) / 2**30:.1f}"


if __name__ == "__main__":
    main()
