"""Blockwise sampler benchmark, side by side in one run on the same model and prompts, in the paper's regime:

the PRISM authors' LLaDA canvas (`sampler.canvas`): each row is its prompt followed by masks up to 1024
positions, decoded in blocks of 32 from the prompt's end to the canvas's end with N // 32 steps per block
(N = 256: 8 steps per block of 32, 4 tokens per pass), K_block remasks per block, argmax tokens, confidence order.

1. the authors' loop as they run it (`llada_inference`, re-implemented plainly here from its description):
   the whole canvas through the model and its softmax over the vocabulary at every step, per-row top-k;
2. prism-ds's sampler on the same canvas, same blocks and steps: uncached, prefix KV cache, dual KV cache
   (the same regime: the same tokens per pass), and dual cache + confidence-threshold decoding with
   Fast-dLLM's rule (a block takes passes until full, whatever N says: its own regime, printed per row);
   `none` vs `prism` (PRISM's overhead: the head and the remask choice; the passes are the same).
Every row states its regime (generated tokens per pass) and how many of its tokens equal the authors' loop's.

The model is an LLaDA with random weights and LLaDA's vocabulary (126464), with the projection+linear head;
`--size 8b` on a GPU (bf16), a small one on CPU (fp32; the authors autocast to fp16 on GPU).

    .venv/bin/python eval/bench_sampler.py [--size small|medium|8b] [--steps 256 128] [--batch 1] [--prompt 128]
        [--canvas 1024] [--threshold 0.9] [--sharpen 100]
"""
from __future__ import annotations

import argparse
import time

import torch
from tqdm import tqdm

from prism_ds.core.sampler import SamplerSettings, SamplingRecord, sample
from prism_ds.core.schedules import BlockwiseSchedule
from prism_ds.models.backbone import HFBackbone
from prism_ds.models.llada import LLaDAConfig, LLaDAModelLM
from prism_ds.models.prism_model import PrismModel
from prism_ds.models.quality_heads import build_quality_head

MASK = 126336
SIZES = {"8b": dict(d_model=4096, n_layers=32, n_heads=32, mlp_hidden_size=12288),
         "medium": dict(d_model=512, n_layers=8, n_heads=8, mlp_hidden_size=1536),
         "small": dict(d_model=128, n_layers=4, n_heads=4, mlp_hidden_size=384)}


def _even_split(total: torch.Tensor, steps: int) -> torch.Tensor:
    """[B, steps]: total // steps per step, one more on the first total % steps steps."""
    return total[:, None] // steps + (torch.arange(steps, device=total.device) < (total % steps)[:, None]).long()


def _centred(k: int, steps: int) -> list[int]:
    """k // steps per step, one more on the k % steps steps nearest the block's middle (ties: the earlier one)."""
    nearest = sorted(range(steps), key=lambda i: abs(i - (steps - 1) / 2))
    return [k // steps + (nearest.index(i) < k % steps) for i in range(steps)]


@torch.no_grad()
def authors_loop(model, tokens: torch.Tensor, prompt_len: torch.Tensor, block_length: int, steps: int,
                 k_block: int, policy: str) -> tuple[torch.Tensor, int]:
    """The authors' llada_inference as they run it, plainly; returns (canvas, passes)."""
    B, canvas = tokens.shape
    x, pos = tokens.clone(), torch.arange(canvas, device=tokens.device)
    n_blocks = canvas // block_length
    per_block, passes = max(1, steps // n_blocks), 0
    remask = _centred(k_block, per_block) if policy != "none" else [0] * per_block
    for b in tqdm(range(n_blocks), desc=f"the authors' loop (N = {steps})", leave=False):
        lo = prompt_len + b * block_length
        block = (pos >= lo[:, None]) & (pos < (lo + block_length).clamp(max=canvas)[:, None])
        if not ((x == MASK) & block).any():  # a block past every row's canvas: no pass
            continue
        unmask = _even_split(((x == MASK) & block).sum(1), per_block) + torch.tensor(remask, device=x.device)
        for i in range(per_block):
            out = model(x, need_logits=True, need_quality=policy != "none")  # the whole canvas, every step
            passes += 1
            clean, masked = (x != MASK) & block, (x == MASK) & block
            if not masked.any():
                break
            if remask[i]:
                score = (-out.quality.float()).masked_fill(~clean, float("-inf"))
                for j in range(B):  # per row, as theirs
                    k = min(remask[i], int(clean[j].sum()))
                    x[j, score[j].topk(k).indices] = MASK
            probs = out.logits.float().softmax(-1)  # the whole canvas's softmax over the vocabulary
            x0 = probs.argmax(-1)
            conf = probs.gather(-1, x0[..., None]).squeeze(-1).masked_fill(~masked, float("-inf"))
            for j in range(B):
                k = min(int(unmask[j, i]), int(masked[j].sum()))
                pick = conf[j].topk(k).indices
                x[j, pick] = x0[j, pick]
    return x, passes


def main() -> None:
    """Time the authors' loop and prism-ds's sampler modes on the same prompts and print tokens/s side by side."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", choices=sorted(SIZES), default="8b" if torch.cuda.is_available() else "small")
    p.add_argument("--steps", type=int, nargs="+", default=[256, 128])
    p.add_argument("--canvas", type=int, default=1024)
    p.add_argument("--block-length", type=int, default=32)
    p.add_argument("--k-block", type=int, default=4)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt", type=int, default=128, help="prompt tokens")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per prism-ds sampler (the best counts)")
    p.add_argument("--threshold", type=float, default=0.9)
    p.add_argument("--sharpen", type=float, default=1.0, help="scale the random output layer: > 1 makes the "
                   "random model confident, as a trained one is (threshold decoding only saves passes then)")
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    cfg = LLaDAConfig(**SIZES[args.size], vocab_size=126464, embedding_size=126464, mask_token_id=MASK)
    with torch.device(device):
        base = LLaDAModelLM(cfg).to(dtype).eval()
        with torch.no_grad():
            base.model.transformer.ff_out.weight.mul_(args.sharpen)
            base.model.transformer.ff_out.weight[MASK] = 0  # a trained LLaDA never proposes the mask
        head = build_quality_head("projection+linear", cfg.d_model, None)
        with torch.no_grad():
            head.net[-1].weight.normal_()  # a trained head ranks tokens; the zero-initialised one ties them all
        model = PrismModel(HFBackbone(base), head).to(dtype)
    tokens = torch.full((args.batch, args.canvas), MASK, device=device)
    tokens[:, :args.prompt] = torch.randint(0, 126080, (args.batch, args.prompt), device=device)
    fixed = tokens != MASK
    schedule = BlockwiseSchedule(args.block_length, args.k_block, canvas=args.canvas)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    modes = {"uncached": {}, "prefix cache": {"cache": "prefix"}, "dual cache": {"cache": "dual"},
             f"dual cache + threshold {args.threshold} (Fast-dLLM rule)": {"cache": "dual",
                                                                          "threshold": args.threshold}}
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"LLaDA {args.size} (random weights, vocab 126464, output layer x{args.sharpen}) on {name}, {dtype}: "
          f"canvas {args.canvas} = prompt {args.prompt} + {args.canvas - args.prompt} masks, blocks of "
          f"{args.block_length}, K_block {args.k_block}, batch {args.batch}, argmax, confidence order")
    for steps in args.steps:
        _bench(model, tokens, fixed, schedule, modes, steps, args, sync)


def _bench(model, tokens, fixed, schedule, modes, steps, args, sync) -> None:
    """One table at N = `steps`: the authors' loop, then every prism-ds mode with `none` and `prism`."""
    generated = args.batch * (args.canvas - args.prompt)

    def ours(policy: str, cache: str = "none", threshold: float | None = None, record: SamplingRecord | None = None):
        settings = SamplerSettings(MASK, steps, schedule, policy=policy, unmask_order="confidence", temperature=0.0,
                                   cache=cache, threshold=threshold)
        return lambda: sample(model, tokens, fixed, settings, record=record)

    prompt_len = torch.full((args.batch,), args.prompt, device=tokens.device)
    authors = "the authors' loop (whole canvas every step), prism"  # one run: long enough that drift averages out
    outputs, passes, computed, results = {}, {}, {}, {}
    t0 = _clock(sync)
    outputs[authors], passes[authors] = authors_loop(model, tokens, prompt_len, args.block_length, steps,
                                                     args.k_block, "prism")
    results[authors] = generated / (_clock(sync) - t0)
    computed[authors] = passes[authors] * args.canvas * args.batch / generated
    for mode in tqdm(modes, desc=f"samplers (N = {steps})", leave=False):
        names = {policy: f"prism-ds {mode}, {policy}" for policy in ("none", "prism")}
        for policy, name in names.items():
            record = SamplingRecord()
            outputs[name] = ours(policy, **modes[mode], record=record)()  # warm-up; counts the positions computed
            computed[name] = sum(rows * (hi - lo) for rows, (lo, hi) in record.passes) / generated
            passes[name] = len(record.passes)
        # none and prism alternate, best of the repeats: drift on a shared machine hits both alike
        best = {name: float("inf") for name in names.values()}
        for _ in range(args.repeats):
            for policy, name in names.items():
                start = _clock(sync)
                ours(policy, **modes[mode])()
                best[name] = min(best[name], _clock(sync) - start)
        results.update({name: generated / t for name, t in best.items()})
    gen = fixed.logical_not()
    print(f"\nN = {steps} ({steps // schedule.n_blocks} steps per block of {args.block_length})")
    print("| sampler | generated tokens/s | passes | tokens per pass | positions computed per token | "
          "tokens equal to the authors' loop |")
    print("|---|---|---|---|---|---|")
    for run, tps in results.items():
        same = (outputs[run] == outputs[authors])[gen].float().mean().item()
        same = f"{100 * same:.1f}%" if run.endswith("prism") else "-"  # the authors' loop ran PRISM
        print(f"| {run} | {tps:.1f} | {passes[run]} | {generated / passes[run]:.1f} | {computed[run]:.0f} | "
              f"{same} |")
    for mode in modes:
        none, prism = f"prism-ds {mode}, none", f"prism-ds {mode}, prism"
        per_token = results[none] / results[prism] - 1
        per_pass = (1 + per_token) * passes[none] / passes[prism] - 1  # time per pass: the head and remask choice
        print(f"PRISM overhead over none, {mode}: {100 * per_token:+.1f}% time per token, {100 * per_pass:+.1f}% "
              f"time per pass ({passes[prism]} vs {passes[none]} passes)")
    same_regime = max(v for k, v in results.items() if k.endswith("prism") and "threshold" not in k
                      and k != authors)
    fastest = max(v for k, v in results.items() if k.endswith("prism") and k != authors)
    print(f"prism-ds vs the authors' loop at the same regime (prism, best cache mode): "
          f"{same_regime / results[authors]:.1f}x tokens/s; with threshold decoding: {fastest / results[authors]:.1f}x")


def _clock(sync) -> float:
    """Wall-clock seconds after the device has finished its queued work."""
    sync()
    return time.perf_counter()


if __name__ == "__main__":
    main()
