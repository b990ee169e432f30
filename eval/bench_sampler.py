"""Blockwise sampler benchmark, side by side in one run on the same model and prompts:

1. tokens/s of vanilla (`none`) vs PRISM sampling in every mode of prism-ds's sampler: uncached, prefix
   KV cache, dual KV cache, dual cache + confidence-threshold decoding (PRISM's overhead: the head and the
   remask choice; the forward passes are the same);
2. backbone positions computed per generated token, and agreement of the cached modes' tokens with the
   uncached sampler's;
3. all of it against a plain re-implementation of the authors' LLaDA loop, which pads the canvas to 1024
   positions with masks and processes the whole canvas's logits at every step.

The model is an LLaDA with random weights and LLaDA's vocabulary (126464), with the projection+linear
head; `--size 8b` on a GPU (bf16), a small one on CPU. Generation: gen_length 256 in blocks of 32,
K_block remasks per block, argmax tokens, confidence order.

    .venv/bin/python eval/bench_sampler.py [--size small|medium|8b] [--steps 256 128] [--batch 1] [--prompt 128]
        [--threshold 0.9]
"""
from __future__ import annotations

import argparse
import time

import torch
from tqdm import tqdm

from prism_ds.core.sampler import SamplingExtras, sample
from prism_ds.core.schedules import BlockwiseSchedule
from prism_ds.core.schedules.blockwise import remask_steps
from prism_ds.models.backbone import HFBackbone
from prism_ds.models.llada import LLaDAConfig, LLaDAModelLM
from prism_ds.models.prism_model import PrismModel
from prism_ds.models.quality_heads import build_quality_head

MASK = 126336
SIZES = {"8b": dict(d_model=4096, n_layers=32, n_heads=32, mlp_hidden_size=12288),
         "medium": dict(d_model=512, n_layers=8, n_heads=8, mlp_hidden_size=1536),
         "small": dict(d_model=128, n_layers=4, n_heads=4, mlp_hidden_size=384)}


@torch.no_grad()
def authors_loop(model, prompt: torch.Tensor, gen_length: int, block_length: int, steps: int, k_block: int,
                 canvas: int = 1024) -> torch.Tensor:
    """The authors' loop, plainly: a fixed canvas of masks, full-canvas logits and softmax every step."""
    B, P = prompt.shape
    x = torch.full((B, canvas), MASK, device=prompt.device)
    x[:, :P] = prompt
    n_blocks, per_block = gen_length // block_length, steps // (gen_length // block_length)
    remasks = remask_steps(k_block, per_block)
    for b in range(n_blocks):
        lo, hi = P + b * block_length, P + (b + 1) * block_length
        n = block_length
        base = [n // per_block + (i < n % per_block) for i in range(per_block)]
        for i in range(per_block):
            out = model(x)
            probs = out.logits.float().softmax(-1)  # the whole canvas, every step
            x0 = probs.argmax(-1)
            conf = probs.gather(-1, x0[..., None]).squeeze(-1)
            inside = torch.zeros_like(conf, dtype=torch.bool)
            inside[:, lo:hi] = True
            masked = x == MASK
            k = remasks[i]
            if k:  # remask the lowest-quality clean tokens of the block
                q = out.quality.float().masked_fill(~(inside & ~masked), float("inf"))
                x = x.scatter(1, q.topk(k, largest=False).indices, MASK)
            conf = conf.masked_fill(~(inside & masked), float("-inf"))  # remasked tokens wait a step
            pick = conf.topk(base[i] + k).indices
            x = x.scatter(1, pick, x0.gather(1, pick))
    return x[:, P:P + gen_length]


def main() -> None:
    """Time the three samplers on the same prompts and print tokens/s side by side."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", choices=sorted(SIZES), default="8b" if torch.cuda.is_available() else "small")
    p.add_argument("--steps", type=int, nargs="+", default=[256, 128])
    p.add_argument("--gen-length", type=int, default=256)
    p.add_argument("--block-length", type=int, default=32)
    p.add_argument("--k-block", type=int, default=4)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt", type=int, default=128, help="prompt tokens")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per sampler (the best counts)")
    p.add_argument("--threshold", type=float, default=0.9)
    p.add_argument("--sharpen", type=float, default=1.0, help="scale the random output layer: > 1 makes the "
                   "random model confident, as a trained one is (threshold decoding only saves steps then)")
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    cfg = LLaDAConfig(**SIZES[args.size], vocab_size=126464, embedding_size=126464, mask_token_id=MASK)
    with torch.device(device):
        base = LLaDAModelLM(cfg).to(dtype).eval()
        with torch.no_grad():
            base.model.transformer.ff_out.weight.mul_(args.sharpen)
        model = PrismModel(HFBackbone(base), build_quality_head("projection+linear", cfg.d_model, None)).to(dtype)
    prompt = torch.randint(0, 126080, (args.batch, args.prompt), device=device)
    tokens = torch.cat([prompt, torch.full((args.batch, args.gen_length), MASK, device=device)], 1)
    fixed = torch.zeros_like(tokens, dtype=torch.bool)
    fixed[:, :args.prompt] = True
    schedule = BlockwiseSchedule(args.prompt, args.gen_length, args.block_length, args.k_block)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    modes = {"uncached": {}, "prefix cache": {"cache": "prefix"}, "dual cache": {"cache": "dual"},
             f"dual cache + threshold {args.threshold}": {"cache": "dual", "threshold": args.threshold}}
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"LLaDA {args.size} (random weights, vocab 126464, output layer x{args.sharpen}) on {name}: gen "
          f"{args.gen_length}, block {args.block_length}, K_block {args.k_block}, batch {args.batch}, prompt "
          f"{args.prompt}, argmax, confidence order")
    for steps in args.steps:
        _bench(model, tokens, fixed, prompt, schedule, modes, steps, args, sync)


def _bench(model, tokens, fixed, prompt, schedule, modes, steps, args, sync) -> None:
    """One table: every mode and policy, and the authors' loop, at `steps` sampling steps."""
    def ours(policy: str, cache: str = "none", threshold: float | None = None, calls: list | None = None):
        return lambda: sample(model, tokens, fixed, MASK, steps, schedule, policy=policy,
                              unmask_order="confidence", temperature=0.0,
                              extras=SamplingExtras(cache=cache, threshold=threshold, calls=calls))

    results, computed, passes, outputs = {}, {}, {}, {}
    for mode in tqdm(modes, desc=f"samplers ({steps} steps)", leave=False):
        names = {policy: f"prism-ds {mode}, {policy}" for policy in ("none", "prism")}
        for policy, name in names.items():
            calls: list = []
            outputs[name] = ours(policy, **modes[mode], calls=calls)()  # warm-up; counts the positions computed
            computed[name] = sum(rows * (hi - lo) for rows, (lo, hi) in calls) / (args.batch * args.gen_length)
            passes[name] = len(calls)
        # none and prism alternate, best of the repeats: drift on a shared machine hits both alike
        best = {name: float("inf") for name in names.values()}
        for _ in range(args.repeats):
            for policy, name in names.items():
                best[name] = min(best[name], _seconds(ours(policy, **modes[mode]), sync))
        results.update({name: args.batch * args.gen_length / t for name, t in best.items()})
    authors = "authors' loop (1024 canvas), prism"  # one run: long enough that drift averages out
    results[authors] = args.batch * args.gen_length / _seconds(
        lambda: authors_loop(model, prompt, args.gen_length, args.block_length, steps, args.k_block), sync)
    computed[authors], passes[authors] = steps * 1024 / args.gen_length, steps
    print(f"\n{steps} steps")
    print("| sampler | generated tokens/s | passes | positions computed per token | tokens equal to uncached |")
    print("|---|---|---|---|---|")
    for run, tps in results.items():
        base = outputs.get(f"prism-ds uncached, {run.rsplit(', ', 1)[-1]}")
        agree = "" if run not in outputs else f"{100 * (outputs[run] == base)[:, args.prompt:].float().mean():.1f}%"
        print(f"| {run} | {tps:.1f} | {passes[run]} | {computed[run]:.0f} | {agree} |")
    for mode in modes:
        none, prism = f"prism-ds {mode}, none", f"prism-ds {mode}, prism"
        per_token = results[none] / results[prism] - 1
        per_pass = (1 + per_token) * passes[none] / passes[prism] - 1  # time per pass: the head and remask choice
        print(f"PRISM overhead over none, {mode}: {100 * per_token:+.1f}% time per token, {100 * per_pass:+.1f}% "
              f"time per pass ({passes[prism]} vs {passes[none]} passes)")
    fastest = max(v for k, v in results.items() if "threshold" in k and k.endswith("prism"))
    print(f"dual cache + threshold (prism) vs the authors' loop: {fastest / results[authors]:.1f}x tokens/s")


def _seconds(fn, sync) -> float:
    """Wall-clock seconds of one call of fn."""
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


if __name__ == "__main__":
    main()
