"""Calibration of the quality head: expected calibration error and a reliability diagram.

sigmoid(g_i) is read as the probability that token i is right (label 1[x_i = y_i]). The paper
names calibration of the quality head as a missing check, so prism-ds logs it live to TensorBoard.
ECE = sum over equal-width confidence bins of (bin share) * |accuracy - mean confidence|; 0 means
the head's probabilities can be taken at face value.
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


def reliability_diagram(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 10, size: int = 256) -> torch.Tensor:
    """An RGB uint8 image [3, size, size] of the reliability diagram, for SummaryWriter.add_image (CHW)."""
    conf, acc, count = reliability_bins(probs, labels, n_bins)
    img = torch.full((3, size, size), 255, dtype=torch.uint8)
    margin, strip = size // 16, size // 10  # frame margin; count histogram strip at the bottom
    plot = size - 2 * margin - strip  # side of the square plot area
    top, left = margin, margin

    def fill(y0: int, y1: int, x0: int, x1: int, rgb: tuple[int, int, int], alpha: float = 1.0) -> None:
        ys, xs = slice(max(y0, 0), max(y1, 0)), slice(max(x0, 0), max(x1, 0))
        colour = torch.tensor(rgb, dtype=torch.float32).view(3, 1, 1)
        img[:, ys, xs] = (img[:, ys, xs].float() * (1 - alpha) + colour * alpha).round().to(torch.uint8)

    for k in range(1, 4):  # light grid at 0.25 / 0.5 / 0.75
        r = top + plot - k * plot // 4
        fill(r, r + 1, left, left + plot, (225, 225, 225))
        fill(top, top + plot, left + k * plot // 4, left + k * plot // 4 + 1, (225, 225, 225))
    width = plot / n_bins
    for b in range(n_bins):
        x0, x1 = left + int(b * width) + 1, left + int((b + 1) * width) - 1
        if count[b] == 0:
            continue
        bar = int(round(float(acc[b]) * plot))
        fill(top + plot - bar, top + plot, x0, x1, (66, 114, 196))  # accuracy (blue)
        c = int(round(float(conf[b]) * plot))  # gap to the bin's confidence (red)
        lo, hi = sorted((top + plot - bar, top + plot - c))
        fill(lo, hi, x0, x1, (222, 60, 50), alpha=0.4)  # translucent: the blue bar shows through
        h = int(round(float(count[b] / count.max()) * (strip - 4)))  # sample counts (grey)
        fill(size - margin - h, size - margin, x0, x1, (150, 150, 150))
    # Diagonal y = x (perfect calibration) and the frame.
    xs = torch.arange(plot)
    img[:, top + plot - 1 - xs, left + xs] = 0
    fill(top, top + plot, left - 1, left, (0, 0, 0))
    fill(top + plot, top + plot + 1, left - 1, left + plot, (0, 0, 0))
    return img
