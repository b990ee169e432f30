"""Tests for prism_ds.core.calibration (ECE, reliability bins, reliability diagram)."""
import math

import pytest
import torch

from prism_ds.core.calibration import expected_calibration_error, reliability_bins

def test_ece_calibrated_small_and_overconfident_large():
    g = torch.Generator().manual_seed(0)
    p = torch.rand(200_000, generator=g)
    y = torch.bernoulli(p, generator=g)
    assert expected_calibration_error(p, y) < 0.02
    p_over = torch.full((200_000,), 0.9)
    y_over = torch.bernoulli(torch.full((200_000,), 0.5), generator=g)
    assert expected_calibration_error(p_over, y_over) == pytest.approx(0.4, abs=0.01)


def test_ece_hand_computation_with_edges_and_empty_bin():
    # 4 bins: [0,.25) [.25,.5) [.5,.75) [.75,1]; bin 2 is empty, 0.25/0.75 sit on left edges, 1.0 in the last bin.
    p = torch.tensor([0.0, 0.1, 0.25, 0.3, 0.75, 0.8, 1.0], dtype=torch.float64)
    y = torch.tensor([0, 1, 0, 1, 1, 0, 1])
    conf, acc, count = reliability_bins(p, y, n_bins=4)
    assert count.tolist() == [2, 2, 0, 3]
    assert conf[0].item() == pytest.approx(0.05) and acc[0].item() == pytest.approx(0.5)
    assert conf[1].item() == pytest.approx(0.275) and acc[1].item() == pytest.approx(0.5)
    assert conf[3].item() == pytest.approx(0.85) and acc[3].item() == pytest.approx(2 / 3)
    assert math.isnan(conf[2]) and math.isnan(acc[2])
    expected = (2 * 0.45 + 2 * 0.225 + 3 * abs(2 / 3 - 0.85)) / 7  # = 1.9 / 7
    assert expected_calibration_error(p, y, n_bins=4) == pytest.approx(expected, abs=1e-9)
    assert expected_calibration_error(p.float(), y.bool(), n_bins=4) == pytest.approx(expected, abs=1e-6)
    assert math.isnan(expected_calibration_error(torch.empty(0), torch.empty(0)))


def test_reliability_bins_counts_and_empty_bins():
    g = torch.Generator().manual_seed(1)
    p = torch.rand(1000, generator=g) * 0.5  # nothing above 0.5 -> upper bins empty
    y = torch.bernoulli(p, generator=g)
    conf, acc, count = reliability_bins(p.view(10, 100), y.view(10, 100), n_bins=10)
    assert conf.shape == acc.shape == count.shape == (10,)
    assert count.sum().item() == 1000
    assert (count[5:] == 0).all() and torch.isnan(conf[5:]).all() and torch.isnan(acc[5:]).all()
    assert not torch.isnan(conf[:5]).any() and (count[:5] > 0).all()
    lo = torch.arange(5) / 10
    assert ((conf[:5] >= lo) & (conf[:5] < lo + 0.1)).all()


def test_reliability_figure_has_labelled_axes_title_bars_and_counts():
    from prism_ds.engine.plots import reliability_figure

    # bin 3 (p=0.9): all correct; bin 1 (p=0.4): all wrong; bin 2 (p=0.6): half correct; bin 0 empty.
    p = torch.tensor([0.9] * 10 + [0.4] * 10 + [0.6] * 20)
    y = torch.tensor([1] * 10 + [0] * 10 + [1, 0] * 10)
    fig = reliability_figure(p, y, n_bins=4)
    ax, ax_n = fig.axes
    assert "accuracy" in ax.get_ylabel() and "confidence" in ax_n.get_xlabel() and "tokens" in ax_n.get_ylabel()
    ece = expected_calibration_error(p, y, n_bins=4)
    assert f"ECE {ece:.3f}" in ax.get_title() and "n = 40" in ax.get_title()
    accuracy_bars, gap_bars = ax.containers
    # One accuracy bar per non-empty bin, left to right, with the bin's observed accuracy as its height.
    assert [round(b.get_x() + b.get_width() / 2, 3) for b in accuracy_bars] == [0.375, 0.625, 0.875]
    assert [b.get_height() for b in accuracy_bars] == pytest.approx([0.0, 0.5, 1.0])
    # Gap bars run from the accuracy to the bin's mean confidence.
    assert [(b.get_y(), b.get_y() + b.get_height()) for b in gap_bars] == [
        pytest.approx((0.0, 0.4)), pytest.approx((0.5, 0.6)), pytest.approx((1.0, 0.9))]
    assert [b.get_height() for b in ax_n.containers[0]] == [0, 10, 20, 10]
    diagonal = ax.lines[0].get_xydata()
    assert diagonal.tolist() == [[0, 0], [1, 1]]


def test_reliability_figure_roundtrip_tensorboard(tmp_path):
    from torch.utils.tensorboard import SummaryWriter
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from prism_ds.engine.plots import reliability_figure

    g = torch.Generator().manual_seed(2)
    p = torch.rand(500, generator=g)
    with SummaryWriter(str(tmp_path)) as writer:
        writer.add_figure("calibration/reliability", reliability_figure(p, torch.bernoulli(p, generator=g)), 0)
    ea = EventAccumulator(str(tmp_path))
    ea.Reload()
    image = ea.Images("calibration/reliability")[0]
    assert image.width > 200 and image.height > 200
