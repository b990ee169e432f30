"""Building PRISM training sequences y from z (Algorithm 1 lines 5-7, appendix D.3/D.4).

y is z with k masked positions filled by sampling the *detached* logits of the same forward pass
that gives the MDM loss, so a training step needs no extra backbone pass to propose y.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from prism_ds.core.sampling_utils import gumbel_noise, sample_tokens, select_top


@dataclass
class YBatch:
    """n_y proposals per z, stacked along the batch: row r belongs to z row r // ... (repeat_interleave)."""

    y: torch.Tensor  # [B * n_y, L] z with the chosen positions filled
    chosen: torch.Tensor  # [B * n_y, L] bool, the positions whose quality is supervised
    label: torch.Tensor  # [B * n_y, L] float, 1[x_i = y_i] (meaningful where chosen)


def build_y(x: torch.Tensor, z: torch.Tensor, masked: torch.Tensor, logits: torch.Tensor, k: int, n_y: int = 1,
            positions: str = "random", top_p: float = 1.0, temperature: float = 1.0,
            generator: torch.Generator | None = None, mask_id: int | None = None) -> YBatch:
    """Fill k masked positions of each z (n_y independent subsets) with tokens sampled from f(. | z).

    positions: "random" picks the subset uniformly; "confidence" picks the masked positions where
    f is most confident (max probability). Rows with fewer than k masked positions use them all.
    temperature 0 fills with argmax (the paper's LLaDA recipe); otherwise nucleus sampling with top_p.
    mask_id: the mask token is never proposed (nor counted in the confidence), as at sampling time.
    """
    if k < 1 or n_y < 1:
        raise ValueError(f"prism.k={k} and prism.n_y={n_y} must be >= 1")
    logits = logits.detach()  # stop-gradient: y is data for the quality head, not a path for f's gradient
    if mask_id is not None:
        logits = logits.clone()
        logits[..., mask_id] = float("-inf")
    rep = lambda t: t.repeat_interleave(n_y, dim=0)  # noqa: E731
    x, z, masked, logits = rep(x), rep(z), rep(masked), rep(logits)
    if positions == "random":
        scores = gumbel_noise(masked.shape, generator, masked.device)
    elif positions == "confidence":
        scores = logits.float().softmax(-1).amax(-1)
    else:
        raise ValueError(f"prism.y_positions={positions!r}: expected 'random' or 'confidence'")
    counts = torch.full((z.shape[0],), k, device=z.device)
    chosen = select_top(scores, masked, counts)
    tokens, _ = sample_tokens(logits, temperature=temperature, top_p=top_p, generator=generator)
    y = torch.where(chosen, tokens, z)
    return YBatch(y=y, chosen=chosen, label=(y == x).float())
