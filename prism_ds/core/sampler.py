"""The one sampling loop (Algorithms 2 and 3, LLaDA's blockwise sampler, Fast-dLLM's fast sampling) for every model.

Each step reads as: plan -> loop-step pre-remask -> pass -> choose remasks -> draw -> choose unmasks -> commit ->
retire rows. Each decision belongs to a part of its own, so a new sampler is a new part, not a branch in the loop:
  schedule     (core/schedules) where a step may act and how many tokens to unmask and remask; its pacing
               (schedules/pacing.py) which step each row is at, which rows need no pass and when a window closes
  remask policy (core/remask.py) which clean tokens go back to the mask, and whether the step needs the quality head
  decoder      (core/decoding.py) which masked tokens become clean: a count by order, or a confidence threshold
  model pass   (core/model_pass.py, core/kv_cache.py) the forward pass, guidance, and the KV cache (none, prefix,
               dual) that decides what a pass recomputes
Fixed tokens (Sudoku clues, prompts, padding) never change. Rows that are finished (every position filled, or stopped
at EOS) leave the batch, so they cost no more passes; under a threshold, a row whose block is filled moves on to its
next block without waiting for the others.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from tqdm import tqdm

from prism_ds.core.decoding import decoder_for
from prism_ds.core.kv_cache import CACHE_MODES, PassCache
from prism_ds.core.model_pass import ModelPass
from prism_ds.core.remask import RemaskPolicy, choose_remask, no_quality_error, scorer_missing
from prism_ds.core.sampling_utils import sample_tokens
from prism_ds.core.schedules import Schedule, StepPlan
from prism_ds.core.schedules.pacing import THRESHOLD_STEPS, pacing_for

if TYPE_CHECKING:
    from prism_ds.config import SamplerConfig


@dataclass
class SamplerSettings:
    """How sample() fills the masks; beyond the first three, the defaults are plain MDM sampling.

    allowed_tokens: bool [V]; tokens outside it are never drawn (e.g. only digits fill a Sudoku cell).
    threshold: confidence-threshold parallel decoding in (0, 1] (blockwise schedule only); threshold_steps "ignore"
        (Fast-dLLM) lets a block take passes until it is full, whatever num_steps plans, "cap" bounds it by the plan.
    cache: none | prefix | dual KV cache (backbones without one fall back to none, with a warning).
    cfg_scale: classifier-free guidance, logits = u + (scale + 1) (c - u), u from a pass with the prompt masked.
    eos_confidence: EOS proposals rank with confidence x eos_confidence when choosing what to unmask (< 1 delays EOS).
    stop_at_eos: when a row's window (block) closes with an EOS in it, every later mask becomes EOS and the row stops.
    """

    mask_id: int
    num_steps: int
    schedule: Schedule
    policy: str = "none"
    unmask_order: str = "random"
    temperature: float = 1.0
    top_p: float = 1.0
    allowed_tokens: torch.Tensor | None = None
    threshold: float | None = None
    threshold_steps: str = "ignore"
    cache: str = "none"
    cfg_scale: float = 0.0
    eos_id: int | None = None
    eos_confidence: float = 1.0
    stop_at_eos: bool = False

    @classmethod
    def from_config(cls, cfg: SamplerConfig, mask_id: int, num_steps: int, schedule: Schedule, policy: str,
                    **overrides) -> SamplerSettings:
        """One sampler row's settings: order, temperature and top_p from a SamplerConfig, the rest from the arguments
        (the blockwise sampler's cache, threshold, guidance and EOS settings are its callers' to pass)."""
        return cls(mask_id, num_steps, schedule, policy=policy, unmask_order=cfg.unmask_order,
                   temperature=cfg.temperature, top_p=cfg.top_p, **overrides)

    def check(self) -> None:
        """Raise a ValueError naming the setting for values sample() cannot run."""
        if self.num_steps < 1:
            raise ValueError(f"sampler steps={self.num_steps} must be >= 1")
        if self.stop_at_eos and self.eos_id is None:
            raise ValueError("sampler.stop_at_eos needs the tokenizer's EOS id (SamplerSettings.eos_id)")
        check_fast_sampling(self.cache, self.threshold, self.threshold_steps)


@dataclass
class SamplingRecord:
    """What a sample() call did: every pass's (rows, positions [lo, hi) computed) and, with keep_steps, every step's
    (tokens after it, remasked, unmasked) for the whole batch (a loop step's pre-remasked tokens count as remasked)."""

    keep_steps: bool = False
    passes: list[tuple[int, tuple[int, int]]] = field(default_factory=list)
    steps: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=list, repr=False)

    def add_step(self, tokens: torch.Tensor, rows: torch.Tensor, remasked: torch.Tensor,
                 unmasked: torch.Tensor) -> None:
        """Keep a step (when keep_steps): the batch's tokens after it, and the rows' remasked / unmasked positions."""
        if self.keep_steps:
            full_remask = torch.zeros_like(tokens, dtype=torch.bool)
            full_unmask = torch.zeros_like(full_remask)
            full_remask[rows], full_unmask[rows] = remasked, unmasked
            self.steps.append((tokens.clone(), full_remask, full_unmask))


def check_fast_sampling(cache: str, threshold: float | None, threshold_steps: str = "ignore") -> None:
    """Raise a ValueError naming the setting when the cache mode or the threshold is not valid."""
    if cache not in CACHE_MODES:
        raise ValueError(f"sampler.cache={cache!r}: expected one of {CACHE_MODES}")
    if threshold is not None and not 0 < threshold <= 1:
        raise ValueError(f"sampler.threshold={threshold} must be in (0, 1] (0 in a config turns it off)")
    if threshold_steps not in THRESHOLD_STEPS:
        raise ValueError(f"sampler.threshold_steps={threshold_steps!r}: expected one of {THRESHOLD_STEPS}")


_DRAW_CHUNK = 8192  # positions per float64 draw: at OWT's 50k vocabulary one buffer is 3.3 GB, not B x L x V x 8 B


def _draw(logits, rows, cols, mask_id: int, allowed_tokens, temperature: float, top_p: float, generator,
          need_drawn_prob: bool):
    """Tokens at the (rows, cols) positions of logits [B, W, V], their model probabilities and (need_drawn_prob)
    the probabilities under the (nucleus-renormalised) distribution they were drawn from, in float64 chunks."""
    drawn = torch.empty(len(rows), dtype=torch.long, device=logits.device)
    prob = torch.empty(len(rows), dtype=torch.float64, device=logits.device)
    drawn_prob = torch.empty_like(prob)
    for i in range(0, len(rows), _DRAW_CHUNK):
        part = slice(i, i + _DRAW_CHUNK)
        sub = logits[rows[part], cols[part]].double()
        sub[..., mask_id] = float("-inf")  # a sampled token is never the mask
        if allowed_tokens is not None:  # e.g. only digits may fill a Sudoku cell
            sub[..., ~allowed_tokens] = float("-inf")
        drawn[part], prob[part], drawn_prob[part] = sample_tokens(sub, temperature=temperature, top_p=top_p,
                                                                  generator=generator, need_drawn_prob=need_drawn_prob)
    return drawn, prob, drawn_prob


def fill_masks(logits: torch.Tensor, tokens: torch.Tensor, masked: torch.Tensor, mask_id: int,
               allowed_tokens: torch.Tensor | None = None, temperature: float = 1.0, top_p: float = 1.0,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """`tokens` [B, L] with every `masked` position replaced by a draw from logits [B, L, V] (Token-Critic's x̂),
    drawn as the sampler draws: never the mask, only allowed_tokens (bool [V]), in float64 chunks."""
    out = tokens.clone()
    rows, cols = masked.nonzero(as_tuple=True)
    out[rows, cols] = _draw(logits.detach(), rows, cols, mask_id, allowed_tokens, temperature, top_p, generator,
                            need_drawn_prob=False)[0]
    return out


def _pre_remask(plan: StepPlan, tok, msk, clean, mask_id: int, generator):
    """PRISM-loop's loop steps: min(M, #clean) tokens of the window remasked uniformly at random before the pass (and
    refilled from it); returns (tok, msk, clean, remasked)."""
    if plan.pre_remask is None:
        return tok, msk, clean, torch.zeros_like(msk)
    uniform = torch.zeros(msk.shape, dtype=torch.float64, device=msk.device)
    pre = choose_remask(uniform, clean & plan.window, plan.pre_remask, None, generator)
    return tok.masked_fill(pre, mask_id), msk | pre, clean & ~pre, pre


def _propose(logits, fillable, cols, s: SamplerSettings, stored_conf: bool, generator):
    """Draws for the fillable positions only (the float64 Gumbel and nucleus sort over the vocabulary are a step's
    largest cost, at OWT's 50k vocabulary more than the pass): (proposal [B, L], confidence used to choose what to
    unmask [B, L], confidence to store for ReMDM-conf [B, L] — the renormalised nucleus probability, as ReMDM's)."""
    r, c = fillable[:, cols].nonzero(as_tuple=True)
    drawn, drawn_prob, drawn_conf = _draw(logits, r, c, s.mask_id, s.allowed_tokens, s.temperature, s.top_p,
                                          generator, need_drawn_prob=stored_conf)
    proposal = torch.zeros_like(fillable, dtype=torch.long)
    prob = torch.zeros(fillable.shape, dtype=torch.float64, device=fillable.device)
    conf = torch.zeros_like(prob)
    proposal[r, cols[c]], prob[r, cols[c]], conf[r, cols[c]] = drawn, drawn_prob, drawn_conf
    if s.eos_id is not None and s.eos_confidence != 1.0:
        prob = torch.where(proposal == s.eos_id, prob * s.eos_confidence, prob)
    return proposal, prob, conf


def _close_windows(tok, msk, window, left, s: SamplerSettings):
    """Rows that `left` their window: with stop_at_eos, one whose window holds an EOS is done, every later mask EOS;
    returns (tok, msk, done [R])."""
    if not s.stop_at_eos:
        return tok, msk, torch.zeros_like(left)
    done = ((tok == s.eos_id) & window & left[:, None]).any(1)
    tok = torch.where(done[:, None] & msk, torch.full_like(tok, s.eos_id), tok)
    return tok, msk & ~done[:, None], done


@torch.no_grad()
def sample(model, tokens: torch.Tensor, fixed: torch.Tensor, settings: SamplerSettings, *,
           attention_mask: torch.Tensor | None = None, cfg_mask: torch.Tensor | None = None,
           generator: torch.Generator | None = None, record: SamplingRecord | None = None,
           progress: bool = False) -> torch.Tensor:
    """Fill every non-fixed mask of `tokens` [B, L] as `settings` say; returns the new tokens.

    attention_mask [B, L]: 1 = real token (left-padded prompt batches); cfg_mask [B, L]: the positions masked for
    guidance's unconditional pass (the prompt). record: receives the passes (and steps) made.
    """
    s = settings
    s.check()
    if scorer_missing(s.policy, model):  # before any pass: steps that remask nothing do not ask the head,
        raise no_quality_error(s.policy)  # so a short run might never notice
    policy, decoder = RemaskPolicy(s.policy), decoder_for(s.threshold, s.unmask_order)
    pacing = pacing_for(s.schedule, s.num_steps, len(tokens), s.policy, s.threshold, s.threshold_steps, tokens.device)
    model_pass = ModelPass(model, s.mask_id, s.cfg_scale, attention_mask, cfg_mask,
                           PassCache.for_model(s.cache, model, s.cfg_scale, len(tokens), tokens.device),
                           None if record is None else record.passes)
    tokens = tokens.clone()
    masked = (tokens == s.mask_id) & ~fixed
    target = masked.sum(1)
    # Probability each token had when it was unmasked (ReMDM-conf); fixed/initial tokens are never remasked.
    confidence = torch.ones(tokens.shape, dtype=torch.float64, device=tokens.device)
    active = torch.ones(len(tokens), dtype=torch.bool, device=tokens.device)
    bar = tqdm(total=s.num_steps, desc="sampling", disable=not progress, leave=False)
    while len(rows := pacing.rows(active)):
        tok, msk = tokens[rows], masked[rows]
        clean = ~msk & ~fixed[rows]
        plan = pacing.plan(rows, msk, clean, target[rows], generator)
        idle = pacing.idle(rows, plan, msk)
        if bool(idle.any()):  # rows with nothing to fill or judge in their window move on without a pass
            tok, msk, done = _close_windows(tok, msk, plan.window, pacing.skip(rows, idle, plan), s)
            tokens[rows], masked[rows], active[rows] = tok, msk, active[rows] & ~done
            bar.update(pacing.progress(active) - bar.n)
            continue
        tok, msk, clean, pre = _pre_remask(plan, tok, msk, clean, s.mask_id, generator)
        fillable = msk & plan.window  # the masks before this step's remasking: a token remasked now waits a step
        # Logits only in the window's columns: LLaDA projects one block of 32 to its 126k vocabulary, not the canvas.
        cols = plan.window.any(0).nonzero().flatten()
        logits, quality = model_pass(tok, rows, cols, plan, policy.wants_quality(plan))
        remask = policy.choose(plan, quality, confidence[rows], clean & plan.window, generator)
        proposal, proposal_prob, proposal_conf = _propose(logits, fillable, cols, s, s.policy == "remdm-conf",
                                                          generator)
        unmask = decoder.choose(plan, fillable, pre.sum(1) + remask.sum(1), proposal_prob, pacing.fills(plan),
                                generator)
        tok = torch.where(unmask, proposal, tok).masked_fill(remask, s.mask_id)
        msk = (msk & ~unmask) | remask
        confidence[rows] = torch.where(unmask, proposal_conf, confidence[rows])
        tok, msk, done = _close_windows(tok, msk, plan.window, pacing.advance(rows, plan, msk), s)
        tokens[rows], masked[rows] = tok, msk
        active[rows] = ~done & (msk.any(1) | pacing.waiting(rows, plan))  # finished rows leave the batch
        if record is not None:
            record.add_step(tokens, rows, remask | pre, unmask)
        bar.update(pacing.progress(active) - bar.n)
    bar.close()
    return tokens
