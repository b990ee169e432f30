"""Token sampling and batched top-k selection shared by y-construction and the sampler."""
from __future__ import annotations

import torch


def gumbel_noise(shape: torch.Size, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """Standard Gumbel noise in float64 (float32 Gumbel-max is measurably biased on peaked logits)."""
    u = torch.rand(shape, generator=generator, device=device, dtype=torch.float64)
    return -torch.log((-torch.log(u.clamp_min(1e-300))).clamp_min(1e-300))


def nucleus_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Set logits outside the smallest set of tokens with cumulative probability >= top_p to -inf."""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(-1)
    # Drop a token when the mass strictly before it already reaches top_p (the top token always stays).
    drop_sorted = (probs.cumsum(-1) - probs) >= top_p
    drop_sorted[..., 0] = False  # even top_p <= 0 keeps the argmax, never an all -inf row
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sample_tokens(logits: torch.Tensor, temperature: float = 1.0, top_p: float = 1.0,
                  generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample a token per position by Gumbel-max in float64; temperature 0 means argmax.

    Returns (tokens, probability of each chosen token under the untempered model distribution).
    """
    logits = logits.double()
    if temperature > 0:
        scores = nucleus_filter(logits / temperature, top_p)
        scores = scores + gumbel_noise(scores.shape, generator, logits.device)
    else:
        scores = logits
    tokens = scores.argmax(-1)
    probs = logits.softmax(-1).gather(-1, tokens[..., None]).squeeze(-1)
    return tokens, probs


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
