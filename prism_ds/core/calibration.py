"""Calibration of the quality head: reliability bins and the expected calibration error.

sigmoid(g_i) is read as the probability that token i is right (label 1[x_i = y_i]). The paper
names calibration of the quality head as a missing check, so prism-ds logs it live to TensorBoard.
ECE = sum over equal-width confidence bins of (bin share) * |accuracy - mean confidence|; 0 means
the head's probabilities can be taken at face value. (The diagram is drawn in engine/plots.py.)
"""
from __future__ import annotations

import torch


def reliability_bins(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 10
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per equal-width bin over [0,1]: (mean predicted prob, empirical accuracy, count); empty bins give NaN."""
    p, y = probs.flatten().double().clamp(0, 1), labels.flatten().double()
    idx = (p * n_bins).long().clamp_max(n_bins - 1)  # p = 1.0 falls in the last bin
    count = torch.bincount(idx, minlength=n_bins).double()
    conf = torch.bincount(idx, weights=p, minlength=n_bins) / count
    acc = torch.bincount(idx, weights=y, minlength=n_bins) / count
    return conf, acc, count  # 0/0 leaves NaN in empty bins


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 10) -> float:
    """ECE = sum_b (n_b / N) * |acc_b - conf_b| over equal-width bins (NaN if no samples)."""
    conf, acc, count = reliability_bins(probs, labels, n_bins)
    if count.sum() == 0:
        return float("nan")
    gap = (acc - conf).abs().nan_to_num(0.0)
    return float((count / count.sum() * gap).sum())
