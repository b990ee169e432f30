"""The one sampling loop (Algorithms 2 and 3, LLaDA's blockwise sampler) for every model.

Each step makes one forward pass that gives the unmasking logits and, when the step may remask with PRISM, the
quality of the current tokens; a schedule says where and how much to unmask and remask, a policy which
clean tokens to remask. Fixed tokens (Sudoku clues, prompts, padding) are never changed. Rows that are
finished (every position filled, or stopped at EOS) leave the batch, so they cost no more passes.

Fast sampling for backbones with a KV cache (prism-ds's LLaDA), Fast-dLLM style:
  cache="prefix"  a window's first step is a full pass that caches every position's keys/values; its
                  other steps recompute the window and everything after it, reading the prefix (prompt,
                  finished blocks) from the cache
  cache="dual"    the other steps recompute the window only; the suffix is read from the cache too
  threshold=tau   a step unmasks every masked token of the window whose probability is at least tau (at
                  least one) instead of the schedule's count; with threshold_steps="ignore" (Fast-dLLM's
                  rule, the default) a block takes passes until it is full, whatever the step count plans;
                  with "cap" its last planned step fills it
Remasking reads the quality of the same (partial) pass, for the window's tokens. Without a threshold
it keeps the schedule's plan (K_block per block on its planned steps) and every step makes one pass.
With a threshold, a block's K_block remasks all happen in its second pass (the first one with decoded
tokens to judge), so the remasked tokens are refilled in passes the block mostly needs anyway; a step
with nothing left to unmask or remask makes no pass, and a block ends as soon as it is filled.
A schedule may instead give each masked token an unmask probability (ancestral sampling: MDLM and the
published ReMDM samplers); then those draws, not a count, decide what is unmasked.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from prism_ds.core.remask import choose_remask, needs_quality, no_quality_error, remask_priority, scorer_missing
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
    history: a list that receives, per step, (tokens after the step, remasked, unmasked) of every row; a loop
        step's tokens remasked before the pass count as remasked and, refilled, as unmasked.
    """

    attention_mask: torch.Tensor | None = None
    cfg_scale: float = 0.0
    cfg_mask: torch.Tensor | None = None
    eos_id: int | None = None
    eos_confidence: float = 1.0
    stop_at_eos: bool = False
    history: list | None = field(default=None, repr=False)
    cache: str = "none"  # none | prefix | dual (backbones without a KV cache fall back to none, with a warning)
    threshold: float | None = None  # confidence-threshold parallel decoding, in (0, 1]
    threshold_steps: str = "ignore"  # ignore: a block takes passes until full (Fast-dLLM) | cap: planned steps cap them
    calls: list | None = field(default=None, repr=False)  # receives (rows, positions computed) of every pass


CACHE_MODES = ("none", "prefix", "dual")
THRESHOLD_STEPS = ("ignore", "cap")  # Fast-dLLM: a block takes passes until full | its planned steps cap them


def check_fast_sampling(cache: str, threshold: float | None, threshold_steps: str = "ignore") -> None:
    """Raise a ValueError naming the setting when the cache mode or the threshold is not valid."""
    if cache not in CACHE_MODES:
        raise ValueError(f"sampler.cache={cache!r}: expected one of {CACHE_MODES}")
    if threshold is not None and not 0 < threshold <= 1:
        raise ValueError(f"sampler.threshold={threshold} must be in (0, 1] (0 in a config turns it off)")
    if threshold_steps not in THRESHOLD_STEPS:
        raise ValueError(f"sampler.threshold_steps={threshold_steps!r}: expected one of {THRESHOLD_STEPS}")


def k_block_needs_inner_step(policy: str, threshold: float | None, threshold_steps: str) -> bool:
    """Whether K_block remasks need a planned step after the one that makes them (to refill them): always, except
    under a threshold with Fast-dLLM's rule ("ignore"), where a block takes passes until it is full."""
    return policy != "none" and (threshold is None or threshold_steps == "cap")


def _forward(model, tokens, need_quality: bool, extras: SamplingExtras, attention_mask, cfg_mask, mask_id: int,
             cols: torch.Tensor | None, **cache):
    """Logits at `cols` (all positions when None; guided when cfg_scale > 0) and quality, in one batched pass."""
    def kw(am):  # only what the model needs to be told: scripted and plain models take neither
        return {**({} if am is None else {"attention_mask": am}), **({} if cols is None else {"logits_cols": cols}),
                **cache}

    if extras.cfg_scale <= 0:
        return model(tokens, need_logits=True, need_quality=need_quality, **kw(attention_mask))
    uncond = tokens.masked_fill(cfg_mask, mask_id)
    am = None if attention_mask is None else torch.cat([attention_mask, attention_mask])
    out = model(torch.cat([tokens, uncond]), need_logits=True, need_quality=need_quality, **kw(am))
    cond, un = out.logits.chunk(2)
    out.logits = un + (extras.cfg_scale + 1) * (cond - un)
    out.quality = None if out.quality is None else out.quality[: len(tokens)]  # quality of the real state
    return out


class _KVState:
    """The KV cache of the current window's full pass, for the rows that were generating then."""

    def __init__(self, mode: str):
        self.mode, self.kv, self.rows, self.window = mode, None, None, None

    def fresh_range(self, lo: int, hi: int, length: int) -> tuple[int, int]:
        """What a cached step recomputes: the window and what follows (prefix), or the window (dual)."""
        return (lo, length) if self.mode == "prefix" else (lo, hi)


def _pass(model, tok, rows, cols, need_quality: bool, extras, mask_id, state: _KVState | None, window_key):
    """One forward: (logits at the window columns [B, W, V], quality [B, L] or None), filling or reading a cache.

    window_key names the window; a new one starts with a full pass that refills the cache."""
    pick = lambda t: None if t is None else t[rows]  # noqa: E731
    full_cols = len(cols) == tok.shape[1]
    args = (model, tok, need_quality, extras, pick(extras.attention_mask), pick(extras.cfg_mask), mask_id,
            None if full_cols else cols)
    lo, hi, length = int(cols[0]), int(cols[-1]) + 1, tok.shape[1]
    if state is None or full_cols:
        computed, out = (0, length), _forward(*args)
    elif state.window != window_key:  # a new window (block): full pass, refill the cache
        computed, out = (0, length), _forward(*args, fill_cache=True)
        state.kv, state.rows, state.window = out.kv_cache, rows, window_key
    else:  # rows only ever leave the batch, so they are a subset of the cached ones
        where = torch.searchsorted(state.rows, rows)
        computed = state.fresh_range(lo, hi, length)
        out = _forward(*args, kv_cache=state.kv.rows(where), fresh=computed)
    if extras.calls is not None:
        extras.calls.append((len(rows), computed))
    quality = out.quality
    if quality is not None and quality.shape[1] != length:  # a cached pass scores the positions it computed
        quality = torch.zeros(tok.shape, dtype=quality.dtype, device=tok.device).index_copy(
            1, torch.arange(*computed, device=tok.device), quality)
    return out.logits, quality


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


def _stop_at_eos(tok, msk, window, eos_id: int):
    """Rows whose just-closed window holds an EOS: every later mask becomes EOS and the row is done."""
    done = ((tok == eos_id) & window).any(1)
    tok = torch.where(done[:, None] & msk, torch.full_like(tok, eos_id), tok)
    return tok, msk & ~done[:, None], done


def _choose_unmask(plan, fillable, n_remasked, rank_prob, threshold: float | None, order: str, generator,
                   fill_window: bool):
    """Bool [B, L]: the masked tokens that become clean this step.

    By the plan's per-token rate (ancestral sampling); with a threshold, every token whose confidence is at least
    it and the most confident one (Fast-dLLM's rule, whatever `order`; all of the window when `fill_window`, the
    last planned step under threshold_steps="cap"); else, by `order`, the plan's count plus the tokens remasked
    this step (deterministic counts).
    """
    if plan.unmask_rate is not None:
        u = torch.rand(fillable.shape, generator=generator, device=fillable.device, dtype=torch.float64)
        return (u < plan.unmask_rate[:, None]) & fillable
    if fill_window:
        return fillable
    if threshold is not None:
        most = select_top(rank_prob, fillable, torch.ones(len(fillable), dtype=torch.long, device=fillable.device))
        return fillable & ((rank_prob >= threshold) | most)
    count = torch.minimum(plan.unmask + n_remasked, fillable.sum(1))
    return select_top(unmask_scores(order, rank_prob, generator), fillable, count)


@torch.no_grad()
def sample(model, tokens: torch.Tensor, fixed: torch.Tensor, mask_id: int, num_steps: int, schedule: Schedule,
           policy: str = "none", unmask_order: str = "random", temperature: float = 1.0, top_p: float = 1.0,
           allowed_tokens: torch.Tensor | None = None, generator: torch.Generator | None = None,
           progress: bool = False, extras: SamplingExtras | None = None) -> torch.Tensor:
    """Fill every non-fixed mask in `tokens` [B, L] within num_steps steps (one forward pass each); returns new tokens.

    allowed_tokens: optional bool [V]; tokens outside it are never sampled. Under a threshold with
    threshold_steps="ignore" (Fast-dLLM) a block takes passes until it is full, whatever num_steps plans.
    """
    if num_steps < 1:
        raise ValueError(f"sampler steps={num_steps} must be >= 1")
    extras = extras or SamplingExtras()
    if extras.stop_at_eos and extras.eos_id is None:
        raise ValueError("sampler.stop_at_eos needs the tokenizer's EOS id (SamplingExtras.eos_id)")
    if extras.cfg_scale > 0 and extras.cfg_mask is None:
        raise ValueError("sampler.cfg_scale > 0 needs the positions to mask for the unconditional pass (cfg_mask)")
    check_fast_sampling(extras.cache, extras.threshold, extras.threshold_steps)
    if scorer_missing(policy, model):  # before any pass: steps that remask nothing do not ask the head,
        raise no_quality_error(policy)  # so a short run might never notice
    threshold = extras.threshold is not None
    seen_window, window_step, k_block = None, 0, 0
    if threshold:
        if getattr(schedule, "k_block", None) is None:
            raise ValueError("sampler.threshold needs the blockwise schedule (it decodes block by block)")
        k_block = schedule.k_block
        if k_block_needs_inner_step(policy, extras.threshold, extras.threshold_steps):  # "cap": the remask round
            schedule.check(num_steps, planned_remasks=True)  # (second pass) must be refilled by a later planned step
    state = None
    if extras.cache != "none":
        if extras.cfg_scale > 0:
            raise ValueError("sampler.cache with sampler.cfg_scale > 0 is not supported (use cache=none)")
        if getattr(model, "supports_kv_cache", False):
            state = _KVState(extras.cache)
        else:
            warnings.warn(f"sampler.cache={extras.cache!r}: this model has no KV cache support (or its quality "
                          f"head attends across positions); sampling without a cache", stacklevel=2)
    tokens = tokens.clone()
    masked = (tokens == mask_id) & ~fixed
    target = masked.sum(1)
    # Probability each token had when it was unmasked (ReMDM-conf); fixed/initial tokens are never remasked.
    confidence = torch.ones(tokens.shape, dtype=torch.float64, device=tokens.device)
    active = torch.ones(len(tokens), dtype=torch.bool, device=tokens.device)
    bar = tqdm(total=num_steps, desc="sampling", disable=not progress, leave=False)
    step = 0
    while step < num_steps:
        rows = active.nonzero().flatten()
        if len(rows) == 0:
            break
        tok, msk, fix = tokens[rows], masked[rows], fixed[rows]
        clean = ~msk & ~fix
        # Under a threshold the sampler places the K_block remasks itself (in a block's second pass).
        plan = schedule.plan(step, num_steps, msk, clean, target[rows], remasking=policy != "none" and not threshold,
                             generator=generator)
        pre = torch.zeros_like(msk)
        if plan.pre_remask is not None:  # loop steps: remask uniformly at random before the pass, refill from it
            pre = choose_remask(torch.zeros(msk.shape, dtype=torch.float64, device=msk.device), clean & plan.window,
                                plan.pre_remask, None, generator)
            tok, msk, clean = tok.masked_fill(pre, mask_id), msk | pre, clean & ~pre
        fillable = msk & plan.window
        # Logits and tokens only in the window's columns: LLaDA projects one block of 32 to its 126k
        # vocabulary, not the whole canvas.
        cols = plan.window.any(0).nonzero().flatten()
        if len(cols) == 0:  # every row's canvas ended before this block (the canvas layout): nothing to do
            step, _ = step + 1, bar.update()
            continue
        window = plan.window_id if plan.window_id is not None else (int(cols[0]), int(cols[-1]))
        if threshold:
            window_step = window_step + 1 if window == seen_window else 0  # passes into this window
            if not fillable.any() and (policy == "none" or window_step > 1):
                # The window is filled and its remask round is done: no pass until the next window, but a
                # closing window still stops its rows at EOS.
                if extras.stop_at_eos and plan.window_closes:
                    tok, msk, done = _stop_at_eos(tok, msk, plan.window, extras.eos_id)
                    tokens[rows], masked[rows], active[rows] = tok, msk, ~done
                step, _ = step + 1, bar.update()
                continue
            seen_window = window
            plan.remask_count = torch.full_like(plan.unmask, k_block if (policy != "none" and window_step == 1) else 0)
        # The quality head runs only on steps that may remask (not before l_on, not in loop steps).
        may_remask = policy != "none" and bool(((plan.remask_count if plan.remask_count is not None
                                                 else plan.remask_rate) > 0).any())
        logits, quality = _pass(model, tok, rows, cols, needs_quality(policy) and may_remask, extras, mask_id, state,
                                window)
        remask = torch.zeros_like(msk)
        if policy != "none":  # quality and confidence describe `tok` as it is now, before this step's changes
            # A step that remasks nothing still draws its (unused) tie-breaks, so the random stream is the same.
            priority = (remask_priority(policy, quality, confidence[rows]) if may_remask or not needs_quality(policy)
                        else torch.zeros(msk.shape, dtype=torch.float64, device=msk.device))
            remask = choose_remask(priority, clean & plan.window, plan.remask_count, plan.remask_rate, generator)
        # Draw only where a token can be unmasked: the float64 Gumbel and nucleus sort over the vocabulary
        # are the step's largest cost (at OWT's 50k vocabulary, more than the forward pass).
        r, c = fillable[:, cols].nonzero(as_tuple=True)
        # Only ReMDM-conf reads the stored confidence (the renormalised nucleus probability, as ReMDM stores it).
        drawn, drawn_prob, drawn_conf = _draw(logits, r, c, mask_id, allowed_tokens, temperature, top_p, generator,
                                              need_drawn_prob=policy == "remdm-conf")
        proposal, proposal_prob = tok.clone(), torch.zeros(tok.shape, dtype=torch.float64, device=tok.device)
        proposal_conf = torch.zeros_like(proposal_prob)
        proposal[r, cols[c]], proposal_prob[r, cols[c]], proposal_conf[r, cols[c]] = drawn, drawn_prob, drawn_conf
        rank_prob = proposal_prob
        if extras.eos_id is not None and extras.eos_confidence != 1.0:
            rank_prob = torch.where(proposal == extras.eos_id, proposal_prob * extras.eos_confidence, proposal_prob)
        # fillable holds the masks before this step's remasking: a token remasked now waits a step.
        fill_window = plan.window_closes and (not threshold or extras.threshold_steps == "cap")
        unmask = _choose_unmask(plan, fillable, pre.sum(1) + remask.sum(1), rank_prob, extras.threshold,
                                unmask_order, generator, fill_window)
        tok = torch.where(unmask, proposal, tok).masked_fill(remask, mask_id)
        msk = (msk & ~unmask) | remask
        confidence[rows] = torch.where(unmask, proposal_conf, confidence[rows])
        # Under a threshold a window's K_block remasks come in its second pass: until then its rows wait for them.
        round_pending = threshold and policy != "none" and k_block > 0 and window_step < 1
        # Fast-dLLM's threshold decoding ignores the step count: a block that is not full (or has not had its
        # remask round) after its last planned step takes that step again.
        block_unfinished = plan.window_closes and threshold and extras.threshold_steps == "ignore" \
            and (bool((msk & plan.window).any()) or round_pending)
        done = torch.zeros_like(active[rows])
        if extras.stop_at_eos and plan.window_closes and not block_unfinished:
            tok, msk, done = _stop_at_eos(tok, msk, plan.window, extras.eos_id)
        tokens[rows], masked[rows] = tok, msk
        # A filled row is finished, unless loop steps follow or its current window still has a remask round to run
        # (a row whose canvas ended has an empty window and leaves).
        waiting = plan.window.any(1) & round_pending
        active[rows] = ~done & (msk.any(1) | waiting | schedule.refines_complete(step + 1, num_steps))
        if extras.history is not None:
            full_remask, full_unmask = torch.zeros_like(masked), torch.zeros_like(masked)
            full_remask[rows], full_unmask[rows] = remask | pre, unmask
            extras.history.append((tokens.clone(), full_remask, full_unmask))
        if not block_unfinished:
            step, _ = step + 1, bar.update()
    bar.close()
    return tokens
