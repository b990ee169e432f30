"""Figures for TensorBoard: the quality head's reliability diagram (drawn with matplotlib)."""
from __future__ import annotations

import torch

from prism_ds.core.calibration import expected_calibration_error, reliability_bins


def reliability_figure(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 10, title: str = "quality head"):
    """A matplotlib Figure: per confidence bin the observed accuracy (bars), the gap to the bin's mean
    confidence (red), the diagonal of perfect calibration, and the bin counts (lower panel)."""
    import matplotlib

    matplotlib.use("Agg")  # no display: render off-screen for SummaryWriter.add_figure
    import matplotlib.pyplot as plt

    conf, acc, count = reliability_bins(probs, labels, n_bins)
    edges = torch.linspace(0, 1, n_bins + 1)
    centres, width = ((edges[:-1] + edges[1:]) / 2).tolist(), 1.0 / n_bins
    filled = (count > 0).tolist()
    fig, (ax, ax_n) = plt.subplots(2, 1, figsize=(5, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    xs = [c for c, f in zip(centres, filled) if f]
    ax.bar(xs, [a for a, f in zip(acc.tolist(), filled) if f], width=width * 0.9, color="#4272c4",
           edgecolor="black", linewidth=0.5, label="observed accuracy")
    gaps = [(c, a, m - a) for c, a, m, f in zip(centres, acc.tolist(), conf.tolist(), filled) if f]
    ax.bar([g[0] for g in gaps], [g[2] for g in gaps], bottom=[g[1] for g in gaps], width=width * 0.9,
           color="#de3c32", alpha=0.4, label="gap to mean confidence")
    ax.plot([0, 1], [0, 1], color="black", linestyle="--", linewidth=1, label="perfect calibration")
    ax.set(xlim=(0, 1), ylim=(0, 1), ylabel="observed accuracy: fraction with x_i = y_i",
           title=f"{title}: ECE {expected_calibration_error(probs, labels, n_bins):.3f}, "
                 f"n = {int(count.sum())} tokens")
    ax.legend(loc="upper left", fontsize="small")
    ax_n.bar(centres, count.tolist(), width=width * 0.9, color="grey")
    ax_n.set(xlabel="confidence: sigmoid(g_i)", ylabel="tokens per bin")
    fig.tight_layout()
    return fig
