"""The one sampling loop (Algorithms 2 and 3, LLaDA's blockwise sampler) for every model.

Each step makes one forward pass that gives the unmasking logits and, when the policy needs it, the
quality of the current tokens; a schedule says where and how much to unmask and remask, a policy which
clean tokens to remask. Fixed tokens (Sudoku clues, prompts, padding) are never changed. Rows that are
finished (every position filled, or stopped at EOS) leave the batch, so they cost no more passes.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from prism_ds.core.remask import choose_remask, needs_quality, remask_priority
from prism_ds.core.sampling_utils import sample_tokens, select_top
from prism_ds.core.schedules import Schedule, unmask_scores


@dataclass
class SamplingExtras:
    """Options of LLaDA-style samplers; the defaults change nothing.

    attention_mask: [B, L] 1 = real token (left-padded prompt batches); the model hides padded keys.
    cfg_scale / cfg_mask: classifier-free guidance, logits = u + (scale + 1) (c - u), where u comes from a
        second pass with the cfg_mask positions (the prompt) masked.
    eos_id / eos_confidence: EOS proposals rank with confidence x eos_confidence when choosing what to
        unmask (< 1 delays EOS, as LLaDA's sampler can); forbid EOS with allowed_tokens instead.
    stop_at_eos: when a window (block) closes with an EOS in it, fill every later mask with EOS and stop
        the row: its remaining blocks could only be EOS.
    history: a list that receives, per step, (tokens after the step, remasked, unmasked) of every row.
    """

    attention_mask: torch.Tensor | None = None
    cfg_scale: float = 0.0
    cfg_mask: torch.Tensor | None = None
    eos_id: int | None = None
    eos_confidence: float = 1.0
    stop_at_eos: bool = False
    history: list | None = field(default=None, repr=False)


def _forward(model, tokens, policy: str, extras: SamplingExtras, attention_mask, cfg_mask, mask_id: int,
             cols: torch.Tensor | None):
    """Logits at `cols` (all positions when None; guided when cfg_scale > 0) and quality, in one batched pass."""
    def kw(am):  # only what the model needs to be told: scripted and plain models take neither
        return {**({} if am is None else {"attention_mask": am}), **({} if cols is None else {"logits_cols": cols})}

    if extras.cfg_scale <= 0:
        return model(tokens, need_logits=True, need_quality=needs_quality(policy), **kw(attention_mask))
    uncond = tokens.masked_fill(cfg_mask, mask_id)
    am = None if attention_mask is None else torch.cat([attention_mask, attention_mask])
    out = model(torch.cat([tokens, uncond]), need_logits=True, need_quality=needs_quality(policy), **kw(am))
    cond, un = out.logits.chunk(2)
    out.logits = un + (extras.cfg_scale + 1) * (cond - un)
    out.quality = None if out.quality is None else out.quality[: len(tokens)]  # quality of the real state
    return out


@torch.no_grad()
def sample(model, tokens: torch.Tensor, fixed: torch.Tensor, mask_id: int, num_steps: int, schedule: Schedule,
           policy: str = "none", unmask_order: str = "random", temperature: float = 1.0, top_p: float = 1.0,
           allowed_tokens: torch.Tensor | None = None, generator: torch.Generator | None = None,
           progress: bool = False, extras: SamplingExtras | None = None) -> torch.Tensor:
    """Fill every non-fixed mask in `tokens` [B, L] within num_steps forward passes; returns new tokens.

    allowed_tokens: optional bool [V]; tokens outside it are never sampled.
    """
    if num_steps < 1:
        raise ValueError(f"sampler steps={num_steps} must be >= 1")
    extras = extras or SamplingExtras()
    if extras.stop_at_eos and extras.eos_id is None:
        raise ValueError("sampler.stop_at_eos needs the tokenizer's EOS id (SamplingExtras.eos_id)")
    if extras.cfg_scale > 0 and extras.cfg_mask is None:
        raise ValueError("sampler.cfg_scale > 0 needs the positions to mask for the unconditional pass (cfg_mask)")
    tokens = tokens.clone()
    masked = (tokens == mask_id) & ~fixed
    target = masked.sum(1)
    # Probability each token had when it was unmasked (ReMDM-conf); fixed/initial tokens are never remasked.
    confidence = torch.ones(tokens.shape, dtype=torch.float64, device=tokens.device)
    active = torch.ones(len(tokens), dtype=torch.bool, device=tokens.device)
    for step in tqdm(range(num_steps), desc="sampling", disable=not progress, leave=False):
        rows = active.nonzero().flatten()
        if len(rows) == 0:
            break
        tok, msk, fix = tokens[rows], masked[rows], fixed[rows]
        pick = lambda t: None if t is None else t[rows]  # noqa: E731
        clean = ~msk & ~fix
        plan = schedule.plan(step, num_steps, msk, clean, target[rows], remasking=policy != "none",
                             generator=generator)
        # Logits and tokens only in the window's columns: LLaDA projects one block of 32 to its 126k
        # vocabulary, not the whole canvas.
        cols = plan.window.any(0).nonzero().flatten()
        out = _forward(model, tok, policy, extras, pick(extras.attention_mask), pick(extras.cfg_mask), mask_id,
                       None if len(cols) == tok.shape[1] else cols)
        remask = torch.zeros_like(msk)
        if policy != "none":  # quality and confidence describe `tok` as it is now, before this step's changes
            remask = choose_remask(remask_priority(policy, out.quality, confidence[rows]), clean & plan.window,
                                   plan.remask_count, plan.remask_rate, generator)
        logits = out.logits.double()
        logits[..., mask_id] = float("-inf")  # a sampled token is never the mask
        if allowed_tokens is not None:  # e.g. only digits may fill a Sudoku cell
            logits[..., ~allowed_tokens] = float("-inf")
        drawn, drawn_prob = sample_tokens(logits, temperature=temperature, top_p=top_p, generator=generator)
        proposal, proposal_prob = tok.clone(), torch.zeros(tok.shape, dtype=torch.float64, device=tok.device)
        proposal[:, cols], proposal_prob[:, cols] = drawn, drawn_prob
        rank_prob = proposal_prob
        if extras.eos_id is not None and extras.eos_confidence != 1.0:
            rank_prob = torch.where(proposal == extras.eos_id, proposal_prob * extras.eos_confidence, proposal_prob)
        fillable = msk & plan.window  # a token remasked now is not refilled in the same step
        n_unmask = torch.minimum(plan.unmask + remask.sum(1), fillable.sum(1))
        unmask = select_top(unmask_scores(unmask_order, rank_prob, generator), fillable, n_unmask)
        tok = torch.where(unmask, proposal, tok).masked_fill(remask, mask_id)
        msk = (msk & ~unmask) | remask
        confidence[rows] = torch.where(unmask, proposal_prob, confidence[rows])
        if extras.stop_at_eos and plan.window_closes:
            done = ((tok == extras.eos_id) & plan.window).any(1)  # the block just finished holds an EOS
            tok = torch.where(done[:, None] & msk, torch.full_like(tok, extras.eos_id), tok)
            msk = msk & ~done[:, None]
        tokens[rows], masked[rows] = tok, msk
        active[rows] = msk.any(1)
        if extras.history is not None:
            full_remask, full_unmask = torch.zeros_like(masked), torch.zeros_like(masked)
            full_remask[rows], full_unmask[rows] = remask, unmask
            extras.history.append((tokens.clone(), full_remask, full_unmask))
    return tokens
