"""Tests for prism_ds.core.calibration (ECE, reliability bins, reliability diagram)."""
import math

import pytest
import torch

from prism_ds.core.calibration import expected_calibration_error, reliability_bins, reliability_diagram

def _blue_mask(img: torch.Tensor) -> torch.Tensor:
    """Accuracy-bar pixels: clearly blue-dominant (pure bar colour or bar under the translucent red gap)."""
    r, g, b = img.int()
    return (b > r) & (b > g + 15)  # [H, W]; white/grey/black/pink-over-white all fail


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


def test_reliability_diagram_shape_and_bar_heights():
    size, n_bins = 256, 4
    # bin 3 (p=0.9): all correct; bin 1 (p=0.4): all wrong; bin 2 (p=0.6): half correct; bin 0 empty.
    p = torch.tensor([0.9] * 10 + [0.4] * 10 + [0.6] * 10)
    y = torch.tensor([1] * 10 + [0] * 10 + [1, 0] * 5)
    img = reliability_diagram(p, y, n_bins=n_bins, size=size)
    assert img.dtype == torch.uint8 and img.shape == (3, size, size)
    blue = _blue_mask(img)
    cols = blue.any(dim=0).nonzero().flatten()
    # Bars are contiguous runs of blue columns, left to right in bin order; empty/0-accuracy bins have none.
    breaks = (cols[1:] - cols[:-1] > 1).nonzero().flatten() + 1
    runs = torch.tensor_split(cols, breaks)
    assert len(runs) == 2  # bins 2 (acc 0.5) and 3 (acc 1.0)
    half, full = (blue[:, r] for r in runs)
    assert full.sum() > half.sum() > 0  # accurate bar drawn taller
    assert full.any(dim=1).sum() > 1.8 * half.any(dim=1).sum()
    # y axis points up: both bars share a baseline (bottom row) and the taller one reaches higher (smaller row).
    half_rows, full_rows = half.any(dim=1).nonzero().flatten(), full.any(dim=1).nonzero().flatten()
    assert half_rows.max() == full_rows.max() > size // 2 and full_rows.min() < half_rows.min()
    red = (img[0].int() > img[2].int() + 30) & (img[0].int() > img[1].int() + 30)
    assert red[:, : runs[0][0]].sum() > 0  # the all-wrong bin (p=0.4) shows only its red gap
    assert (img == 255).all(dim=0).float().mean() > 0.3  # mostly white background


def test_reliability_diagram_roundtrip_tensorboard(tmp_path):
    pytest.importorskip("tensorboard")
    pytest.importorskip("PIL")
    from torch.utils.tensorboard import SummaryWriter
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    g = torch.Generator().manual_seed(2)
    p = torch.rand(500, generator=g)
    img = reliability_diagram(p, torch.bernoulli(p, generator=g), size=128)
    writer = SummaryWriter(str(tmp_path))
    writer.add_image("calibration/reliability", img, 0)
    writer.close()
    ea = EventAccumulator(str(tmp_path))
    ea.Reload()
    assert "calibration/reliability" in ea.Tags()["images"]
    ev = ea.Images("calibration/reliability")[0]
    assert (ev.width, ev.height) == (128, 128)
