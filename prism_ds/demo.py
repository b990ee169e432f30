"""The CPU Sudoku demo: data, MDM pretraining, PRISM fine-tuning (and, with critic.steps > 0, the Token-Critic
baseline's critic), the mechanism report (sampler.mechanism_puzzles > 0), then vanilla vs remasking policies.

Rerunning the same command resumes: finished stages are reused, an interrupted stage continues from
its last checkpoint, and finished table cells are read back.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from prism_ds.config import RunConfig
from prism_ds.engine import distributed as dist_utils
from prism_ds.engine.cpu_kernels import describe_cpu
from prism_ds.engine.trainer import train
from prism_ds.models.critic import CriticScored, critic_for
from prism_ds.models.loading import load_model
from prism_ds.sudoku import mechanism
from prism_ds.sudoku.board import MASK_ID
from prism_ds.sudoku.data import board_spec, eval_puzzles
from prism_ds.sudoku.evaluate import evaluate_checkpoint, results_key


def run_demo(cfg: RunConfig, progress: bool = True, overwrite: bool = False) -> str:
    """Run every stage of the demo and return the printed results table."""
    t0 = time.time()
    train(cfg, "pretrain", progress, overwrite)
    final = train(cfg, "finetune", progress, overwrite)
    if cfg.critic.steps > 0:  # the Token-Critic baseline's critic (token-critic rows), against this f_theta
        train(cfg, "critic", progress, overwrite)
    if dist_utils.rank() != 0:
        return ""
    parts = [mechanism_report(final, cfg, progress)] if cfg.sampler.mechanism_puzzles > 0 else []
    parts.append(evaluate_checkpoint(final, cfg, progress))
    report = "\n\n".join(parts) + (f"\n\nTotal demo wall time: {time.time() - t0:.0f} s (stages already done were "
                                   f"skipped) on {describe_cpu()}")
    (Path(cfg.run_dir) / "results.md").write_text(report + "\n")
    return report


def mechanism_report(checkpoint: str | Path, cfg: RunConfig, progress: bool = True) -> str:
    """The mechanism report of a fine-tuned checkpoint (with a token-critic score when the run has a critic);
    cached next to the checkpoint like the success table."""
    s = cfg.sampler
    puzzles, path = eval_puzzles(cfg, progress)
    critic_rows = ["token-critic"] if cfg.critic.steps > 0 or s.critic else []
    critic, critic_path = critic_for(critic_rows, s, cfg.run_dir, dist_utils.device(), checkpoint)
    key = results_key(checkpoint, path, s, critic_path)
    cells = f"{s.mechanism_puzzles}x" + "-".join(map(str, s.steps))  # left out of the key, as for the table
    out = Path(checkpoint).parent / "eval" / f"mechanism_{key}_{cells}.md"
    if out.exists():
        return out.read_text().rstrip("\n")
    device = dist_utils.device()
    model, _ = load_model(checkpoint, device)
    spec = board_spec(cfg)
    scorers = {}
    if critic is not None:  # the critic's logit on x̂ (the board with its masks drawn from f_theta): higher = right
        wrapped = CriticScored(model, critic, MASK_ID, spec.digit_tokens().to(device), seed=s.seed,
                               temperature=s.temperature, top_p=s.top_p)
        scorers["token-critic"] = lambda tokens, fixed: wrapped(tokens, need_logits=True, need_quality=True).quality
    text, results = mechanism.report(model, spec, puzzles[:s.mechanism_puzzles].to(device), s, list(s.steps),
                                     f" ({path})", extra_scorers=scorers, progress=progress)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=1, allow_nan=False) + "\n")
    out.write_text(text + "\n")
    return text
