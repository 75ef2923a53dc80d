"""Receptive fields of the paddings and pools the second mutation audit found untested (issue 24,
item 6): ``padding="same"`` with dilation, asymmetric ``F.pad`` and ``nn.ZeroPad2d``, and
``F.max_pool2d`` without a stride. Every crop must be the bounding box of the unit's gradient
support over a batch of images (autograd through the model, not the geometry)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import connectome as cn
from connectome import patches
from connectome.extract.trace import run_nodes, trace_units


class SameDilated(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        # heights pad 2 on each side, widths 1 left and 2 right (an odd total: the extra one right)
        self.c1 = nn.Conv2d(2, 3, (3, 2), padding="same", dilation=(2, 3))
        self.c2 = nn.Conv2d(3, 2, 3, stride=2, padding=1)
        self.fc = nn.Linear(2 * 6 * 6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.c2(self.c1(x)).flatten(1))


class AsymmetricPads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(2, 3, 3)
        self.pad = nn.ZeroPad2d((2, 0, 0, 3))  # left, right, top, bottom
        self.c2 = nn.Conv2d(3, 2, 3, stride=2)
        self.fc = nn.Linear(2 * 7 * 7, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c1(F.pad(x, (1, 2, 3, 0)))  # left 1, right 2, top 3, bottom 0: 12x12 -> 13x13
        return self.fc(self.c2(self.pad(h)).flatten(1))


class PoolNoStride(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(2, 3, 3, padding=1)
        self.c2 = nn.Conv2d(3, 2, 3)
        self.fc = nn.Linear(2 * 2 * 2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.max_pool2d(self.c1(x), 3)  # no stride: it is the kernel size, 12x12 -> 4x4
        return self.fc(self.c2(h).flatten(1))


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths:UserWarning")
@pytest.mark.parametrize("build,n", [(SameDilated, 2), (AsymmetricPads, 2), (PoolNoStride, 32)],
                         ids=["same padding, dilated", "asymmetric F.pad and ZeroPad2d", "max_pool2d without stride"])
def test_crop_holds_the_gradient_support_and_is_its_bounding_box(build, n):
    torch.manual_seed(0)
    m = build().double().eval()
    # linear stacks: one image shows the support; a max pool's gradient goes to one pixel of
    # its window per image, so the union over many images spans the window
    x = torch.randn(n, 2, 12, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ex = cn.extract.examples(m, x, k=1, progress=False)
    ug = trace_units(m, x[:1])
    fields = ex.meta["examples"]["fields"]
    tight = 0
    for layer in ("c1", "c2"):
        assert fields[layer] is not None, layer
        node = ug.layers[ug.layer_index(layer)].out_node
        xg = x.clone().requires_grad_(True)
        with torch.enable_grad():
            _, kept = run_nodes(ug.gm, (xg,), keep={node})
            v = kept[node]
            n_pos = v.shape[2] * v.shape[3]
            for pos in range(0, n_pos, max(1, n_pos // 25)):  # about 25 positions per layer, spread over the map
                r, c = divmod(pos, v.shape[3])
                (gx,) = torch.autograd.grad(v[:, 1, r, c].sum(), xg, retain_graph=True)
                sup = (gx.abs().sum((0, 1)) > 0).numpy()
                if not sup.any():  # a position of zero padding depends on nothing
                    continue
                rows, cols = np.flatnonzero(sup.any(1)), np.flatnonzero(sup.any(0))
                support = (rows[0], rows[-1] + 1, cols[0], cols[-1] + 1)
                y0, y1, x0, x1 = crop = patches.crop_box(ex, f"{layer}:1", pos)
                inside = np.zeros_like(sup)
                inside[y0:y1, x0:x1] = True
                outside = int((sup & ~inside).sum())
                assert outside == 0, f"{layer} position {pos}: support {support} outside the crop {crop}"
                if 0 < y0 and y1 < sup.shape[0] and 0 < x0 and x1 < sup.shape[1]:
                    assert crop == support, f"{layer} position {pos}"
                    tight += 1
    assert tight >= 4
