"""Remask policies: which clean tokens to send back to the mask each step (higher score = remask first).

  none        vanilla MDM sampling, nothing is remasked
  prism       the K tokens with the lowest learned quality g(x_t) from the current forward pass
  remdm       K tokens uniformly at random (ReMDM)
  remdm-conf  K tokens drawn with probability proportional to softmax(-confidence), where a token's
              confidence is its probability when it was unmasked, kept until it is remasked (ReMDM-conf)
"""
from __future__ import annotations

import torch

from prism_ds.core.sampling_utils import gumbel_noise

POLICIES = ("none", "prism", "remdm", "remdm-conf")


def needs_quality(policy: str) -> bool:
    """Whether the policy reads the quality head (only then is the head evaluated)."""
    return policy == "prism"


def remask_scores(policy: str, quality: torch.Tensor | None, confidence: torch.Tensor,
                  generator: torch.Generator | None) -> torch.Tensor:
    """Score [B, L] for each position; the sampler remasks the top-scoring eligible clean tokens."""
    if policy == "prism":
        if quality is None:
            raise ValueError("sampler.policy='prism' needs a model with a quality head (fine-tune one with `prism-ds train --stage finetune`)")
        return -quality.double()
    if policy == "remdm":
        return gumbel_noise(confidence.shape, generator, confidence.device)
    if policy == "remdm-conf":  # Gumbel-top-K samples K positions without replacement from softmax(-conf)
        return -confidence + gumbel_noise(confidence.shape, generator, confidence.device)
    raise ValueError(f"sampler.policy={policy!r}: expected one of {POLICIES}")
