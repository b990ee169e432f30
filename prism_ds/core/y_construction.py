"""Building PRISM training sequences y from z (Algorithm 1 lines 5-7, appendix D.3/D.4).

y is z with k masked positions filled by sampling the *detached* logits of the same forward pass
that gives the MDM loss, so a training step needs no extra backbone pass to propose y.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from prism_ds.core.sampling_utils import gumbel_noise, sample_tokens, select_top


def _proposable(logits: torch.Tensor, mask_id: int | None, allowed_tokens: torch.Tensor | None) -> torch.Tensor:
    """A copy of logits restricted to what sampling may produce: never the mask, only allowed tokens."""
    if mask_id is None and allowed_tokens is None:
        return logits
    logits = logits.clone()
    if mask_id is not None:
        logits[..., mask_id] = float("-inf")
    if allowed_tokens is not None:
        logits[..., ~allowed_tokens.to(logits.device)] = float("-inf")
    return logits


def _confidence(logits: torch.Tensor, masked: torch.Tensor, mask_id: int | None,
                allowed_tokens: torch.Tensor | None, chunk: int = 256) -> torch.Tensor:
    """[B, L] float64: f's largest probability among proposable tokens, at masked positions only (0 elsewhere).

    Computed in chunks of positions as exp(max - logsumexp): no [B, L, V] fp32 copy or softmax, which at
    LLaDA's vocabulary would cost gigabytes.
    """
    out = torch.zeros(masked.shape, dtype=torch.float64, device=logits.device)
    rows, cols = masked.nonzero(as_tuple=True)
    for i in range(0, len(rows), chunk):
        r, c = rows[i:i + chunk], cols[i:i + chunk]
        sub = _proposable(logits[r, c].float(), mask_id, allowed_tokens)
        out[r, c] = (sub.amax(-1) - sub.logsumexp(-1)).exp().double()
    return out


@dataclass
class YBatch:
    """n_y proposals per z, stacked along the batch: row r belongs to z row r // ... (repeat_interleave)."""

    y: torch.Tensor  # [B * n_y, L] z with the chosen positions filled
    chosen: torch.Tensor  # [B * n_y, L] bool, the positions whose quality is supervised
    label: torch.Tensor  # [B * n_y, L] float, 1[x_i = y_i] (meaningful where chosen)


def build_y(x: torch.Tensor, z: torch.Tensor, masked: torch.Tensor, logits: torch.Tensor, k: int, n_y: int = 1,
            positions: str = "random", top_p: float = 1.0, temperature: float = 1.0,
            generator: torch.Generator | None = None, mask_id: int | None = None,
            allowed_tokens: torch.Tensor | None = None) -> YBatch:
    """Fill k masked positions of each z (n_y subsets) with tokens sampled from f(. | z).

    positions: "random" picks each subset uniformly; "confidence" picks the masked positions where f is
    most confident (max probability) when n_y = 1, and for n_y > 1 draws each subset without
    replacement with probability proportional to that confidence, so the subsets differ.
    Rows with fewer than k masked positions use them all.
    temperature 0 fills with argmax (the paper's LLaDA recipe); otherwise nucleus sampling with top_p.
    mask_id / allowed_tokens: y only holds tokens the sampler can produce (never the mask, e.g. only
    digits in a Sudoku cell), so the head trains on the states it will judge.
    """
    if k < 1 or n_y < 1:
        raise ValueError(f"prism.k={k} and prism.n_y={n_y} must be >= 1")
    logits = logits.detach()  # stop-gradient: y is data for the quality head, not a path for f's gradient
    rep = lambda t: t.repeat_interleave(n_y, dim=0)  # noqa: E731
    if positions == "random":
        scores = gumbel_noise((z.shape[0] * n_y, z.shape[1]), generator, z.device)
    elif positions == "confidence":
        scores = rep(_confidence(logits, masked, mask_id, allowed_tokens))
        if n_y > 1:  # Gumbel-top-k on log-confidence = sampling without replacement proportional to confidence
            scores = scores.log() + gumbel_noise(scores.shape, generator, z.device)
    else:
        raise ValueError(f"prism.y_positions={positions!r}: expected 'random' or 'confidence'")
    x, z, masked = rep(x), rep(z), rep(masked)
    counts = torch.full((z.shape[0],), k, device=z.device)
    chosen = select_top(scores, masked, counts)
    # Sample only at the chosen positions: the full [B, L, V] float64 Gumbel draw would cost more
    # than the backbone pass at LLaDA's vocabulary.
    row, pos = chosen.nonzero(as_tuple=True)
    picked = _proposable(logits[torch.div(row, n_y, rounding_mode="floor"), pos], mask_id, allowed_tokens)
    tokens = sample_tokens(picked, temperature=temperature, top_p=top_p, generator=generator).tokens
    y = z.clone()
    y[row, pos] = tokens
    return YBatch(y=y, chosen=chosen, label=(y == x).float())
