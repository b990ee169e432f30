"""How well the quality head separates right from wrong tokens."""
from __future__ import annotations

import torch


def auroc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Area under the ROC curve of `scores` for binary `labels` (ties get average rank); NaN if one class."""
    scores, labels = scores.flatten().double(), labels.flatten().bool()
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = scores.argsort()
    sorted_scores = scores[order]
    ranks = torch.empty_like(scores)
    ranks[order] = torch.arange(1, len(scores) + 1, dtype=torch.float64)
    # Average ranks over ties so identical scores count as a coin flip.
    uniq, inverse, counts = torch.unique_consecutive(sorted_scores, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    mean_rank = ends - (counts.double() - 1) / 2
    ranks[order] = mean_rank[inverse]
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def mean_ci95(per_unit: torch.Tensor) -> tuple[float, float]:
    """Mean of per-unit values (e.g. each puzzle's success averaged over seeds) and its 95% half-width.

    Normal approximation, 1.96 * sd / sqrt(n): the units are independent draws, repeats within a unit are not.
    """
    v = per_unit.double().flatten()
    if len(v) < 2:
        return float(v.mean()) if len(v) else float("nan"), float("nan")
    return float(v.mean()), float(1.96 * v.std(unbiased=True) / len(v) ** 0.5)
