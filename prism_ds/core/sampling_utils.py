"""Token sampling and batched top-k selection shared by y-construction and the sampler."""
from __future__ import annotations

from typing import NamedTuple

import torch


def gumbel_noise(shape: torch.Size, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """Standard Gumbel noise in float64 (float32 Gumbel-max is measurably biased on peaked logits)."""
    u = torch.rand(shape, generator=generator, device=device, dtype=torch.float64)
    return -torch.log((-torch.log(u.clamp_min(1e-300))).clamp_min(1e-300))


def nucleus_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Set logits outside the nucleus to -inf: the tokens whose cumulative probability (sorted, the token itself
    included) is <= top_p, and always the argmax.

    This is ReMDM's and the PRISM authors' rule (their `diffusion.py` / `prob_path.py`): the token that crosses
    top_p is dropped (for p = [0.85, 0.10, 0.05] at 0.9 only the first token stays), not kept as in Holtzman et
    al.'s "smallest set reaching p"."""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    drop_sorted = sorted_logits.softmax(-1).cumsum(-1) > top_p
    drop_sorted[..., 0] = False  # the argmax always stays, so a row is never all -inf
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


class Draw(NamedTuple):
    """Sampled tokens with two probabilities each: under the model's distribution (confidence order, thresholds)
    and under the tempered, nucleus-renormalised one they were drawn from (ReMDM-conf's stored confidence)."""

    tokens: torch.Tensor
    prob: torch.Tensor
    drawn_prob: torch.Tensor


def drawing_logits(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """The logits tokens are drawn from: tempered and nucleus-filtered, or `logits` itself (the same object) when
    neither changes anything; temperature 0 (argmax) draws from the untempered logits."""
    scaled = logits if temperature in (0.0, 1.0) else logits / temperature
    return nucleus_filter(scaled, top_p) if temperature > 0 else logits


def sample_tokens(logits: torch.Tensor, temperature: float = 1.0, top_p: float = 1.0,
                  generator: torch.Generator | None = None, need_drawn_prob: bool = True) -> Draw:
    """Sample a token per position by Gumbel-max in float64; temperature 0 means argmax (no nucleus).

    need_drawn_prob=False skips the second softmax over the vocabulary (Draw.drawn_prob is then Draw.prob).
    """
    logits = logits.double()
    drawn_from = drawing_logits(logits, temperature, top_p)
    noise = gumbel_noise(logits.shape, generator, logits.device) if temperature > 0 else 0.0
    tokens = (drawn_from + noise).argmax(-1)
    prob_of = lambda lg: lg.softmax(-1).gather(-1, tokens[..., None]).squeeze(-1)  # noqa: E731
    prob = prob_of(logits)
    return Draw(tokens, prob, prob if drawn_from is logits or not need_drawn_prob else prob_of(drawn_from))


def select_top(scores: torch.Tensor, eligible: torch.Tensor, counts: torch.Tensor,
               generator: torch.Generator | None = None, random_ties: bool = False) -> torch.Tensor:
    """Bool [B, L]: per row, the `counts[b]` eligible positions with the highest scores.

    random_ties: equal scores are ordered uniformly at random (so an all-equal score row gives a uniform
    random subset); otherwise the leftmost wins a tie.
    """
    scores = scores.double().masked_fill(~eligible, float("-inf"))
    if random_ties:  # shuffle first, then a stable sort keeps the shuffled order among equal scores
        perm = torch.rand(scores.shape, generator=generator, device=scores.device).argsort(dim=-1)
        order = perm.gather(-1, scores.gather(-1, perm).argsort(dim=-1, descending=True, stable=True))
    else:
        order = scores.argsort(dim=-1, descending=True, stable=True)
    rank = order.argsort(dim=-1)
    return (rank < counts[:, None]) & eligible

