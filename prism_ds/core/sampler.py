"""The one sampling loop (Algorithms 2 and 3) for every model: unmask by a schedule, remask by a policy.

Each step makes one forward pass that gives the unmasking logits and, when the policy needs it, the
quality of the current tokens. Fixed tokens (Sudoku clues, prompts) are never changed.
"""
from __future__ import annotations

import torch
from tqdm import tqdm

from prism_ds.core.remask import choose_remask, needs_quality, remask_priority
from prism_ds.core.sampling_utils import sample_tokens, select_top
from prism_ds.core.schedules import Schedule, unmask_scores


@torch.no_grad()
def sample(model, tokens: torch.Tensor, fixed: torch.Tensor, mask_id: int, num_steps: int, schedule: Schedule,
           policy: str = "none", unmask_order: str = "random", temperature: float = 1.0, top_p: float = 1.0,
           allowed_tokens: torch.Tensor | None = None, generator: torch.Generator | None = None,
           progress: bool = False) -> torch.Tensor:
    """Fill every non-fixed mask in `tokens` [B, L] within num_steps forward passes; returns new tokens.

    allowed_tokens: optional bool [V]; tokens outside it are never sampled.
    """
    if num_steps < 1:
        raise ValueError(f"sampler steps={num_steps} must be >= 1")
    tokens = tokens.clone()
    masked = (tokens == mask_id) & ~fixed
    target = masked.sum(1)
    # Probability each token had when it was unmasked (ReMDM-conf); fixed/initial tokens are never remasked.
    confidence = torch.ones(tokens.shape, dtype=torch.float64, device=tokens.device)
    for step in tqdm(range(num_steps), desc="sampling", disable=not progress, leave=False):
        out = model(tokens, need_logits=True, need_quality=needs_quality(policy))
        logits = out.logits.double()
        logits[..., mask_id] = float("-inf")  # a sampled token is never the mask
        if allowed_tokens is not None:  # e.g. only digits may fill a Sudoku cell
            logits[..., ~allowed_tokens] = float("-inf")
        clean = ~masked & ~fixed
        plan = schedule.plan(step, num_steps, masked, clean, target, remasking=policy != "none", generator=generator)
        remask = torch.zeros_like(masked)
        if policy != "none":  # quality and confidence describe `tokens` as they are now, before this step's changes
            remask = choose_remask(remask_priority(policy, out.quality, confidence), clean & plan.window,
                                   plan.remask_count, plan.remask_rate, generator)
        proposal, proposal_prob = sample_tokens(logits, temperature=temperature, top_p=top_p, generator=generator)
        fillable = masked & plan.window  # a token remasked now is not refilled in the same step
        n_unmask = torch.minimum(plan.unmask + remask.sum(1), fillable.sum(1))
        unmask = select_top(unmask_scores(unmask_order, proposal_prob, generator), fillable, n_unmask)
        tokens = torch.where(unmask, proposal, tokens).masked_fill(remask, mask_id)
        confidence = torch.where(unmask, proposal_prob, confidence)
        masked = (masked & ~unmask) | remask
    return tokens
