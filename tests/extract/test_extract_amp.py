"""amp=True: bfloat16 autocast forward; flows hold only approximately (documented)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

import connectome as cn


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
    ).eval()


def test_amp_flows_are_close_to_float32_flows():
    m = _net()
    x = torch.randn(6, 3, 16, 16)
    y = torch.randint(0, 4, (6,))
    exact = cn.extract.attribution(m, (x, y), progress=False, device="cpu")
    approx = cn.extract.attribution(m, (x, y), progress=False, device="cpu", amp=True)
    assert approx.num_edges == exact.num_edges
    # bfloat16 keeps ~3 significant digits: flows agree to a few percent of their scale
    scale = np.abs(exact.weight).max()
    assert np.abs(approx.weight - exact.weight).max() <= 0.05 * scale
    assert approx.meta["completeness_relative"] < 0.05
    assert exact.meta["completeness_relative"] < 1e-5
