"""Do the KV cache and threshold decoding change what the sampler writes? Cached vs uncached, same settings.

On a trained model (default: the `llada_mbpp_cpu` recipe's export) and MBPP prompts, for each sampler mode
(uncached, prefix cache, dual cache, dual cache + threshold) and policy (none, prism):
- the number of backbone passes, and token agreement of the generated answers with the uncached
  sampler's (same policy, same seed);
- the model's own per-token NLL of the generated answers (a pseudo-likelihood: the answer masked in 8
  interleaved groups, 8 passes), mean with a 95% interval over prompts, and paired against uncached;
- at every cached pass, the mean |logit difference| to the uncached pass on the same state, and how
  often the argmax agrees (the cache's approximation; a block's first pass is exact by construction).
With --batching, what a batch costs instead: every prompt sampled alone, then in batches of codeeval.batch_size
(8), uncached and dual-cached, with the planned count and with the threshold: passes and backbone positions per
generated token, and batch passes / mean single-prompt passes. Under a threshold each row advances through its own
blocks, so a batch takes as many passes as its slowest row, not the sum over blocks of each block's slowest row.

    .venv/bin/python eval/cache_quality.py [--model runs/llada-mbpp/finetune/final] [--tasks 96] [--threshold 0.9]
                                           [--batching]
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
from prism_ds.core.sampler import SamplerSettings, SamplingRecord, sample
from prism_ds.core.schedules import blockwise_schedule
from prism_ds.models.loading import load_model, mask_token_id
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


def pass_counts(model, tokenizer, tasks, cfg, mask_id: int, batch_size: int, policy: str, extra: dict) -> dict:
    """Sample `tasks` in batches of batch_size; passes, positions computed and generated tokens per batch."""
    s, out = cfg.sampler, {"passes": [], "positions": [], "generated": []}
    for start in range(0, len(tasks), batch_size):
        batch = prompt_batch(tokenizer, tasks[start:start + batch_size], cfg, mask_id, "cpu")
        record = SamplingRecord()
        settings = SamplerSettings.from_config(s, mask_id, s.steps[0], blockwise_schedule(s), policy, **extra)
        sample(model, batch.tokens, batch.fixed, settings, attention_mask=batch.attention_mask,
               generator=torch.Generator().manual_seed(start), record=record)
        out["passes"].append(len(record.passes))
        out["positions"].append(sum(rows * (hi - lo) for rows, (lo, hi) in record.passes))
        out["generated"].append(int(((batch.tokens == mask_id) & ~batch.fixed).sum()))
    return out


def batching_table(model, tokenizer, tasks, cfg, mask_id: int, threshold: float) -> tuple[list[str], dict]:
    """Rows of the batched-vs-alone table for every policy, cache mode and decoding, and the raw counts."""
    rows, results, batch = [], {}, cfg.codeeval.batch_size
    modes = [(c, t) for c in ("none", "dual") for t in (None, threshold)]
    for policy in ("none", "prism"):
        for cache, tau in tqdm(modes, desc=f"modes ({policy})"):
            extra = {"cache": cache, "threshold": tau}
            alone = pass_counts(model, tokenizer, tasks, cfg, mask_id, 1, policy, extra)
            batched = pass_counts(model, tokenizer, tasks, cfg, mask_id, batch, policy, extra)
            gen = sum(batched["generated"])
            ratio = (sum(batched["passes"]) / len(batched["passes"])) / (sum(alone["passes"]) / len(alone["passes"]))
            results[f"{policy}|{cache}|{tau or 'planned'}"] = {"alone": alone, "batched": batched,
                                                               "batch_over_alone": ratio}
            rows.append(f"| {policy} | {cache} | {'threshold ' + str(tau) if tau else 'planned count'} | "
                        f"{sum(alone['passes']) / gen:.3f} | {sum(batched['passes']) / gen:.4f} | "
                        f"{sum(alone['positions']) / gen:.1f} | {sum(batched['positions']) / gen:.1f} | {ratio:.2f} |")
    header = ["| policy | cache | decoding | passes / token, alone | passes / token, batched | positions / token, "
              "alone | positions / token, batched | batch passes / mean single-prompt passes |",
              "|---|---|---|---|---|---|---|---|"]
    return header + rows, results


def main() -> None:
    """Run every mode and policy on the same prompts and print the agreement and NLL table."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="runs/llada-mbpp/finetune/final")
    p.add_argument("--recipe", default="llada_mbpp_cpu", help="sampler settings (gen length, blocks, steps, K_block)")
    p.add_argument("--tasks", type=int, default=96)
    p.add_argument("--threshold", type=float, default=0.9)
    p.add_argument("--batching", action="store_true", help="batched vs single-prompt passes instead")
    p.add_argument("--out", default=None, help="JSON results (default eval/results/cache_quality.json, or "
                                                  "threshold_batching.json with --batching)")
    args = p.parse_args()
    args.out = args.out or f"eval/results/{'threshold_batching' if args.batching else 'cache_quality'}.json"
    cfg = load_config(args.recipe)
    s = cfg.sampler
    if s.canvas:
        raise SystemExit(f"{args.recipe}: sampler.canvas={s.canvas}; this comparison uses the gen_length layout "
                         f"(sampler.canvas=0), where every row's answer starts at the same column")
    model, mcfg = load_model(args.model)
    tokenizer = load_tokenizer(type(mcfg.text)(tokenizer=mcfg.model.path))
    mask_id = mask_token_id(mcfg.model.path, tokenizer)
    tasks = load_tasks("mbpp", cfg.codeeval)[:args.tasks]
    if args.batching:
        table, results = batching_table(model, tokenizer, tasks, cfg, mask_id, args.threshold)
        print(f"{len(tasks)} MBPP prompts, {args.model}; gen {s.gen_length}, block {s.block_length}, {s.steps[0]} "
              f"steps, K_block {s.k_block}, batches of {cfg.codeeval.batch_size}")
        print("\n".join(table))
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=1))
        return
    modes = {"uncached": {}, "prefix": {"cache": "prefix"}, "dual": {"cache": "dual"},
             f"dual+threshold {args.threshold}": {"cache": "dual", "threshold": args.threshold}}
    results, outputs = {}, {}
    for policy in ("none", "prism"):
        for mode, extra in tqdm(modes.items(), desc=f"modes ({policy})"):
            wrapped = _Compare(model)
            filled, nll, record = [], [], SamplingRecord()
            for start in range(0, len(tasks), cfg.codeeval.batch_size):
                batch = prompt_batch(tokenizer, tasks[start:start + cfg.codeeval.batch_size], cfg, mask_id, "cpu")
                width = int(batch.starts[0])  # the gen_length layout: every row's answer starts there
                settings = SamplerSettings.from_config(s, mask_id, s.steps[0], blockwise_schedule(s), policy, **extra)
                out = sample(wrapped, batch.tokens, batch.fixed, settings, attention_mask=batch.attention_mask,
                             generator=torch.Generator().manual_seed(start), record=record)
                filled.append(out[:, width:])
                nll.append(pseudo_nll(model, out, slice(width, None), mask_id, batch.attention_mask))
            outputs[policy, mode], nll = torch.cat(filled), torch.cat(nll)
            base = outputs[policy, "uncached"]
            results[policy, mode] = {
                "agreement": (outputs[policy, mode] == base).float().mean().item(), "passes": len(record.passes),
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
