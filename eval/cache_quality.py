"""Do the KV cache and threshold decoding change what the sampler writes? Cached vs uncached, same settings.

On a trained model (default: the `llada_mbpp_cpu` recipe's export) and MBPP prompts, for each sampler mode
(uncached, prefix cache, dual cache, dual cache + threshold) and policy (none, prism):
- the number of backbone passes, and token agreement of the generated answers with the uncached
  sampler's (same policy, same seed);
- the model's own per-token NLL of the generated answers (a pseudo-likelihood: the answer masked in 8
  interleaved groups, 8 passes), mean with a 95% interval over prompts, and paired against uncached;
- at every cached pass, the mean |logit difference| to the uncached pass on the same state, and how
  often the argmax agrees (the cache's approximation; a block's first pass is exact by construction).

    .venv/bin/python eval/cache_quality.py [--model runs/llada-mbpp/finetune/final] [--tasks 96] [--threshold 0.9]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from tqdm import tqdm

from prism_ds.codeeval.generate import prompt_batch
from prism_ds.codeeval.tasks import load_tasks
from prism_ds.config import load_config
from prism_ds.core.metrics import mean_ci95
from prism_ds.core.sampler import SamplingExtras, sample
from prism_ds.core.schedules import blockwise_schedule
from prism_ds.engine.checkpoint import load_model
from prism_ds.models.loading import mask_token_id
from prism_ds.text.tokenizer import load_tokenizer


class _Compare(torch.nn.Module):
    """Wraps the model: every cached pass is also run uncached on the same state, and the gap recorded."""

    supports_kv_cache = True

    def __init__(self, model):
        super().__init__()
        self.model, self.gaps, self.agree = model, [], []

    def forward(self, tokens, **kw):
        out = self.model(tokens, **kw)
        if "fresh" in kw:
            ref = self.model(tokens, need_logits=True, need_quality=False, attention_mask=kw.get("attention_mask"),
                             logits_cols=kw["logits_cols"])
            self.gaps.append((out.logits.float() - ref.logits.float()).abs().mean().item())
            self.agree.append((out.logits.argmax(-1) == ref.logits.argmax(-1)).float().mean().item())
        return out


@torch.no_grad()
def pseudo_nll(model, tokens: torch.Tensor, gen: slice, mask_id: int, attention, groups: int = 8) -> torch.Tensor:
    """Per-sample mean NLL of the generated tokens, each predicted with its group of the answer masked."""
    total = torch.zeros(len(tokens), dtype=torch.float64)
    positions = torch.arange(tokens.shape[1])[gen]
    for g in range(groups):
        cols = positions[g::groups]
        masked = tokens.clone()
        masked[:, cols] = mask_id
        logits = model(masked, need_logits=True, need_quality=False, attention_mask=attention, logits_cols=cols).logits
        nll = torch.nn.functional.cross_entropy(logits.double().transpose(1, 2), tokens[:, cols], reduction="none")
        total += nll.sum(1).cpu()
    return total / len(positions)


def main() -> None:
    """Run every mode and policy on the same prompts and print the agreement and NLL table."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="runs/llada-mbpp/finetune/final")
    p.add_argument("--recipe", default="llada_mbpp_cpu", help="sampler settings (gen length, blocks, steps, K_block)")
    p.add_argument("--tasks", type=int, default=96)
    p.add_argument("--threshold", type=float, default=0.9)
    p.add_argument("--out", default="eval/results/cache_quality.json")
    args = p.parse_args()
    cfg = load_config(args.recipe)
    s = cfg.sampler
    if s.canvas:
        raise SystemExit(f"{args.recipe}: sampler.canvas={s.canvas}; this comparison uses the gen_length layout "
                         f"(sampler.canvas=0), where every row's answer starts at the same column")
    model, mcfg = load_model(args.model)
    tokenizer = load_tokenizer(type(mcfg.text)(tokenizer=mcfg.model.path))
    mask_id = mask_token_id(mcfg.model.path, tokenizer)
    tasks = load_tasks("mbpp", cfg.codeeval)[:args.tasks]
    modes = {"uncached": {}, "prefix": {"cache": "prefix"}, "dual": {"cache": "dual"},
             f"dual+threshold {args.threshold}": {"cache": "dual", "threshold": args.threshold}}
    results, outputs = {}, {}
    for policy in ("none", "prism"):
        for mode, extra in tqdm(modes.items(), desc=f"modes ({policy})"):
            wrapped = _Compare(model)
            filled, nll, calls = [], [], []
            for start in range(0, len(tasks), cfg.codeeval.batch_size):
                batch = prompt_batch(tokenizer, tasks[start:start + cfg.codeeval.batch_size], cfg, mask_id, "cpu")
                width = int(batch.starts[0])  # the gen_length layout: every row's answer starts there
                out = sample(wrapped, batch.tokens, batch.fixed, mask_id, s.steps[0], blockwise_schedule(s),
                             policy=policy, unmask_order=s.unmask_order, temperature=s.temperature,
                             generator=torch.Generator().manual_seed(start),
                             extras=SamplingExtras(attention_mask=batch.attention_mask, calls=calls, **extra))
                filled.append(out[:, width:])
                nll.append(pseudo_nll(model, out, slice(width, None), mask_id, batch.attention_mask))
            outputs[policy, mode], nll = torch.cat(filled), torch.cat(nll)
            base = outputs[policy, "uncached"]
            results[policy, mode] = {
                "agreement": (outputs[policy, mode] == base).float().mean().item(), "passes": len(calls),
                "nll": mean_ci95(nll), "nll_minus_uncached": mean_ci95(nll - results[policy, "uncached"]["_nll"])
                if mode != "uncached" else (0.0, 0.0), "_nll": nll,
                "logit_gap": sum(wrapped.gaps) / max(len(wrapped.gaps), 1),
                "argmax_agree": sum(wrapped.agree) / max(len(wrapped.agree), 1) if wrapped.agree else None}
    print(f"{len(tasks)} MBPP prompts, {args.model}; gen {s.gen_length}, block {s.block_length}, {s.steps[0]} steps, "
          f"K_block {s.k_block}")
    print("| policy | mode | passes | tokens equal to uncached | own NLL / token (95%) | NLL - uncached (paired 95%) | "
          "mean abs logit gap (cached passes) | argmax agrees |")
    print("|---|---|---|---|---|---|---|---|")
    for (policy, mode), r in results.items():
        nll, diff = r["nll"], r["nll_minus_uncached"]
        gap = "" if r["argmax_agree"] is None else f"{r['logit_gap']:.4f} | {100 * r['argmax_agree']:.1f}%"
        print(f"| {policy} | {mode} | {r['passes']} | {100 * r['agreement']:.1f}% | {nll[0]:.3f} ± {nll[1]:.3f} | "
              f"{diff[0]:+.3f} ± {diff[1]:.3f} | {gap or '- | -'} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({f"{k[0]}|{k[1]}": {m: v for m, v in r.items() if m != "_nll"}
                                          for k, r in results.items()}, indent=1))


if __name__ == "__main__":
    main()
