"""Remask policies: *which* clean tokens go back to the mask (the schedule decides *how many*).

A policy gives every clean token a remask priority (higher = remask first):
  none        nothing is remasked (vanilla MDM sampling)
  prism       the lowest learned quality g(x_t), from the current forward pass, first
  remdm       all equal: a uniformly random subset (ReMDM)
  remdm-conf  the lowest confidence first; a token's confidence is its probability when it was
              unmasked, kept until it is remasked (ReMDM-conf; the authors' code overwrote it every step)
  token-critic  the lowest Token-Critic score first: a separate critic's logit for each token of x̂, the
              board with every mask filled from this pass's logits (models/critic.py: CriticScored)

The schedule's remask count (schedules.REMASK_COUNTS) turns priorities into a choice:
  fixed, binomial  a count K per row; the K highest priorities are remasked, ties at random
  per-token        each clean token independently with probability sigma_t * softmax(priority)_i
The published ReMDM variants (Wang et al. 2025) are then ReMDM-cap = remdm with binomial counts and
sigma_t = min(eta, sigma_max), and ReMDM-conf = remdm-conf with per-token draws and sigma_t = sigma_max, both
with ancestral unmasking (rows "remdm:binomial/ancestral", "remdm-conf:per-token/ancestral"); without
"/ancestral" the same remask rules run with the deterministic unmask count of Algorithms 2 and 3.
"""
from __future__ import annotations

import torch

from prism_ds.core.sampling_utils import select_top
from prism_ds.core.schedules import REMASK_COUNTS, SCHEDULE_KINDS, StepPlan

POLICIES = ("none", "prism", "remdm", "remdm-conf", "token-critic")


def check_policy(policy: str) -> None:
    """Raise a ValueError naming sampler.policy when `policy` is unknown."""
    if policy not in POLICIES:
        raise ValueError(f"sampler.policy={policy!r}: expected one of {POLICIES}")


def needs_quality(policy: str) -> bool:
    """Whether the policy reads the model's quality (PRISM's head, or a critic's scores); only then is it computed."""
    return policy in ("prism", "token-critic")


def scorer_missing(policy: str, model) -> bool:
    """Whether `model` lacks what the policy ranks by: a quality head (prism) or a critic (token-critic, whose
    scores come from a CriticScored wrapper; a PRISM head must never stand in for them)."""
    if policy == "token-critic":
        return getattr(model, "critic", None) is None
    return needs_quality(policy) and getattr(model, "quality_head", True) is None


def no_quality_error(policy: str) -> ValueError:
    """The error for a policy that reads the quality head (or, token-critic, a critic) on a model without one."""
    if policy == "token-critic":
        return ValueError("sampler.policy='token-critic' needs a critic: train one with `prism-ds train --stage "
                          "critic critic.steps=N` and set sampler.critic to its export (default "
                          "<run_dir>/critic/final); Sudoku evaluation and `prism-ds sample` load it")
    return ValueError(f"sampler.policy={policy!r} needs a model with a quality head "
                      "(fine-tune one with `prism-ds train --stage finetune`)")


def remask_priority(policy: str, quality: torch.Tensor | None, confidence: torch.Tensor) -> torch.Tensor:
    """Priority [B, L] float64 of each position for remasking (higher first); deterministic."""
    check_policy(policy)
    if policy in ("prism", "token-critic"):
        if quality is None:
            raise no_quality_error(policy)
        return -quality.double()
    if policy == "remdm-conf":
        return -confidence.double()
    return torch.zeros_like(confidence, dtype=torch.float64)  # remdm (and none): every token alike


def choose_remask(priority: torch.Tensor, eligible: torch.Tensor, count: torch.Tensor | None,
                  rate: torch.Tensor | None, generator: torch.Generator | None) -> torch.Tensor:
    """Bool [B, L] of the tokens to remask: top-`count` priorities, or per-token draws at `rate` [B]."""
    if rate is None:
        return select_top(priority, eligible, count, generator=generator, random_ties=True)
    weights = priority.masked_fill(~eligible, float("-inf")).softmax(-1).nan_to_num(0.0)  # rows with none eligible
    p = (rate.double()[:, None] * weights).clamp(0, 1)
    return (torch.rand(p.shape, generator=generator, device=p.device, dtype=torch.float64) < p) & eligible


class RemaskPolicy:
    """A policy as the sampler uses it on a step: whether it wants the quality head, and which tokens it remasks."""

    def __init__(self, name: str):
        check_policy(name)
        self.name, self.remasks = name, name != "none"

    def may_remask(self, plan: StepPlan) -> bool:
        """Whether the plan lets this step remask anything (not before l_on, not on loop steps, not K = 0)."""
        planned = plan.remask_count if plan.remask_count is not None else plan.remask_rate
        return self.remasks and bool((planned > 0).any())

    def wants_quality(self, plan: StepPlan) -> bool:
        """Whether the pass must compute the quality (PRISM's head, a critic): only on steps that may remask."""
        return needs_quality(self.name) and self.may_remask(plan)

    def choose(self, plan: StepPlan, quality: torch.Tensor | None, confidence: torch.Tensor, eligible: torch.Tensor,
               generator: torch.Generator | None) -> torch.Tensor:
        """Bool [B, L]: the eligible (clean, in the window) tokens to remask; quality and confidence describe the
        tokens as they are before this step's changes."""
        if not self.remasks:
            return torch.zeros_like(eligible)
        # A step that remasks nothing still draws its (unused) tie-breaks, so the random stream is the same.
        priority = (remask_priority(self.name, quality, confidence) if self.may_remask(plan) or not needs_quality(
            self.name) else torch.zeros(eligible.shape, dtype=torch.float64, device=eligible.device))
        return choose_remask(priority, eligible, plan.remask_count, plan.remask_rate, generator)


def parse_row(spec: str, default_count: str = "fixed") -> tuple[str, str, str]:
    """A sampler row "policy[:count][/schedule]" (e.g. "prism:binomial/loop") -> (policy, count, schedule kind).

    The schedule kind is one of SCHEDULE_KINDS, "even" when left out ("ancestral": the published MDLM / ReMDM
    sampler, each masked token unmasking independently; it needs a rate count). A loop needs a remasking policy, and
    "remdm-loop" has its own count rule (binomial at sampler.loop_eta), so its count is always "binomial".
    """
    head, slash, kind = spec.partition("/")
    if slash and kind not in SCHEDULE_KINDS:
        raise ValueError(f"sampler.policies: {spec!r}: schedule {kind!r} is not one of {SCHEDULE_KINDS}")
    kind = kind or "even"
    policy, _, explicit = head.partition(":")
    count = explicit or default_count
    check_policy(policy)
    if count not in REMASK_COUNTS:
        raise ValueError(f"sampler.policies: {spec!r}: remask count {count!r} is not one of {REMASK_COUNTS}")
    if kind == "ancestral" and policy != "none" and count == "fixed":
        raise ValueError(f"sampler.policies: {spec!r}: ancestral sampling remasks by a rate; use :binomial "
                         f"(ReMDM-cap) or :per-token (ReMDM-conf)")
    if kind in ("loop", "remdm-loop") and policy == "none":
        raise ValueError(f"sampler.policies: {spec!r}: policy 'none' remasks nothing, so a /{kind} schedule "
                         f"needs a remasking policy")
    if kind == "remdm-loop":
        if explicit and explicit != "binomial":
            raise ValueError(f"sampler.policies: {spec!r}: remdm-loop draws its own binomial counts "
                             f"(sampler.loop_eta); remask count {explicit!r} does not apply")
        count = "binomial"
    return policy, count, kind


def parse_variant(spec: str, default_count: str = "fixed") -> tuple[str, str]:
    """A sampler row "policy" or "policy:count" (e.g. "remdm:binomial", ReMDM-cap) -> (policy, count).

    For samplers with a fixed schedule (blockwise): a "/schedule" suffix is an error; see parse_row.
    """
    if "/" in spec:
        raise ValueError(f"sampler.policies: {spec!r}: this sampler takes no /schedule (only the even-family "
                         f"samplers, e.g. Sudoku and OWT, take {SCHEDULE_KINDS})")
    policy, count, _ = parse_row(spec, default_count)
    return policy, count
