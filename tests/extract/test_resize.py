"""``F.interpolate`` and ``nn.Upsample``: linear in the positions of each channel, so the
units pass through unchanged and the flows stay exact; nearest upsampling equals the same
model written as an index (a layout op)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from connectome.errors import ExtractionError
import connectome as cn

C = 5


def _data(seed: int, n: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 6, 6, generator=gen, dtype=torch.float64) * 2, torch.tensor([0, 3, 1][:n])


class Resized(nn.Module):
    """conv -> resize x2 -> relu -> conv -> mean -> fc; ``how`` picks the resize."""

    def __init__(self, how: str):
        super().__init__()
        self.how = how
        self.a = nn.Conv2d(3, C, 3, padding=1)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.b = nn.Conv2d(C, C, 3, stride=2)
        self.fc = nn.Linear(C, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.a(x)
        if self.how == "module":
            z = self.up(z)
        elif self.how == "index":  # nearest x2 written as an index of the positions
            i = torch.arange(2 * z.shape[-1], device=z.device) // 2
            z = z[:, :, i][:, :, :, i]
        else:
            z = F.interpolate(z, scale_factor=2, mode=self.how, align_corners=False)
        return self.fc(F.relu(self.b(F.relu(z))).mean((2, 3)))


@pytest.mark.parametrize("how", ["bilinear", "bicubic", "module"])
def test_resize_is_exact(how, exact_graph):
    torch.manual_seed(8)
    m = Resized(how).double().eval()
    x, y = _data(14)
    g = exact_graph(m, x, y, conservation=True)
    assert [l.name for l in g.layers] == ["input", "a", "b", "logits"]


def test_nearest_upsample_equals_an_index(exact_graph):
    torch.manual_seed(9)
    a, b = Resized("module").double().eval(), Resized("index").double().eval()
    b.load_state_dict(a.state_dict())
    x, y = _data(15)
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)
    g1, g2 = exact_graph(a, x, y), exact_graph(b, x, y)
    np.testing.assert_array_equal(g1.src, g2.src)
    np.testing.assert_allclose(g1.weight, g2.weight, rtol=0, atol=1e-12 * float(np.abs(g2.weight).max()))
    # (activation statistics differ: the index version reads z.shape, so a's chain stops at a)
    for name in ("attribution", "bias_attribution"):
        np.testing.assert_allclose(g1.node_attr(name), g2.node_attr(name), rtol=1e-12, atol=1e-12, err_msg=name)


class ResizeUnits(nn.Module):
    """Interpolates a channels-last map over its last two dims: the units' dim is resized."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, C, 3, padding=1)
        self.fc = nn.Linear(C, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = F.interpolate(self.a(x).permute(0, 2, 3, 1), size=(6, C), mode="nearest")
        return self.fc(z.mean((1, 2)))


def test_resizing_the_units_is_refused():
    x, y = _data(16)
    with pytest.raises(ExtractionError, match="pools over the dim that holds the units"):
        cn.extract.attribution(ResizeUnits().double().eval(), (x, y), progress=False, device="cpu")


def test_resize_gives_later_layers_the_whole_image():
    """A resized position covers a fractional stretch of its input grid: no integer box, so the
    layers after it get the whole image (the conservative answer), those before keep theirs."""
    from connectome.extract.receptive import receptive_fields
    from connectome.extract.trace import trace_units

    m = Resized("bilinear").double().eval()
    fields, _ = receptive_fields(trace_units(m, _data(17)[0][:1]))
    assert fields["a"] == [1, -1, 3, 1, -1, 3, 6, 6]
    assert fields["b"] is None
