"""`prism-ds code-eval sweep`: the paper's protocol (appendix D.6): at a fixed number of steps N, try each
K_block of a list for every remasking policy and report the best per policy (vanilla needs no K)."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from prism_ds.codeeval.generate import generate
from prism_ds.codeeval.score import score, table
from prism_ds.engine.distributed import rank


def sweep(benchmark: str, model_dir: str, cfg, k_blocks: list[int], out_dir: str | Path,
          progress: bool = True) -> str:
    """Generate (on every rank) and score (rank 0) every (policy, K_block); returns the full table and the
    best-per-policy table on rank 0, "" elsewhere."""
    out_dir = Path(out_dir)
    reports = []
    for policy in cfg.sampler.policies:
        for k in ([0] if policy == "none" else k_blocks):
            run = replace(cfg, sampler=replace(cfg.sampler, policies=[policy], k_block=k))
            name = f"{benchmark}_{policy.replace(':', '-')}_N{cfg.sampler.steps[0]}_K{k}.jsonl"
            samples = generate(benchmark, model_dir, run, out_dir / name, progress)
            if rank() == 0:  # one scorer: the sandbox already uses every core
                reports.append(score(benchmark, samples, run, progress))
    if rank() != 0:
        return ""
    best = {}
    for r in reports:
        policy = r["settings"]["policy"]
        if policy not in best or r["pass_at"]["pass@1"] > best[policy]["pass_at"]["pass@1"]:
            best[policy] = r
    return (f"All runs:\n\n{table(reports)}\n\nBest K_block per policy at N = {cfg.sampler.steps[0]}:\n\n"
            f"{table(list(best.values()))}")
