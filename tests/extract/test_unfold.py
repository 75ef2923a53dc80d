"""``F.unfold`` / ``nn.Unfold`` (im2col) and ``F.fold`` as layout ops: the units stay the
channels, each over its ``K`` kernel offsets; im2col followed by a Linear is a convolution,
and its flows equal those of the ``Conv2d`` with the same weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import connectome as cn
from connectome.errors import ExtractionError

C, O = 4, 5


def _data(seed: int, n: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 7, 7, generator=gen, dtype=torch.float64) * 2, torch.tensor([0, 3, 1][:n])


class Im2col(nn.Module):
    """conv -> relu -> (unfold + Linear, or the same Conv2d) -> relu -> mean -> fc."""

    def __init__(self, unfolded: bool, module: bool = False):
        super().__init__()
        self.unfolded = unfolded
        self.a = nn.Conv2d(3, C, 1)
        self.b = nn.Linear(C * 9, O) if unfolded else nn.Conv2d(C, O, 3, stride=2, padding=1)
        self.unfold = nn.Unfold(3, padding=1, stride=2) if module else None
        self.fc = nn.Linear(O, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = F.relu(self.a(x))
        if self.unfolded:
            cols = self.unfold(z) if self.unfold is not None else F.unfold(z, 3, padding=1, stride=2)
            z = self.b(cols.transpose(1, 2)).transpose(1, 2).reshape(x.shape[0], O, 4, 4)
        else:
            z = self.b(z)
        return self.fc(F.relu(z).mean((2, 3)))


@pytest.mark.parametrize("module", [False, True], ids=["F.unfold", "nn.Unfold"])
def test_unfold_then_linear_equals_the_convolution(module, exact_graph):
    torch.manual_seed(10)
    a, b = Im2col(True, module).double().eval(), Im2col(False).double().eval()
    with torch.no_grad():
        b.a.load_state_dict(a.a.state_dict())
        b.fc.load_state_dict(a.fc.state_dict())
        b.b.weight.copy_(a.b.weight.reshape(O, C, 3, 3))
        b.b.bias.copy_(a.b.bias)
    x, y = _data(18)
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x), rtol=1e-12, atol=1e-12)
    g1 = exact_graph(a, x, y, conservation=True)
    g2 = exact_graph(b, x, y, conservation=True)
    assert [l.kind for l in g1.layers] == ["input", "conv", "linear", "output"]
    np.testing.assert_array_equal(g1.src, g2.src)
    np.testing.assert_array_equal(g1.dst, g2.dst)
    np.testing.assert_allclose(g1.weight, g2.weight, rtol=0, atol=1e-12 * float(np.abs(g2.weight).max()))
    for name in ("attribution", "bias_attribution"):
        np.testing.assert_allclose(g1.node_attr(name), g2.node_attr(name), rtol=0, atol=1e-12, err_msg=name)


class Refold(nn.Module):
    """unfold then fold: each position times the number of patches that cover it (a constant)."""

    def __init__(self, folded: bool):
        super().__init__()
        self.folded = folded
        self.a = nn.Conv2d(3, C, 3, padding=1)
        self.fc = nn.Linear(C, 4)
        ones = torch.ones(1, 1, 7, 7, dtype=torch.float64)
        self.register_buffer("count", F.fold(F.unfold(ones, 3, padding=1), (7, 7), 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.a(x)
        z = F.fold(F.unfold(z, 3, padding=1), (7, 7), 3, padding=1) if self.folded else z * self.count
        return self.fc(F.relu(z).mean((2, 3)))


def test_fold_of_unfold_equals_the_overlap_count(exact_graph, same_graph):
    torch.manual_seed(11)
    a, b = Refold(True).double().eval(), Refold(False).double().eval()
    b.load_state_dict(a.state_dict())
    x, y = _data(19)
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x), rtol=1e-12, atol=1e-12)
    same_graph(exact_graph(a, x, y, weights=False, conservation=True),
               exact_graph(b, x, y, weights=False, conservation=True), names=False)


class BadFold(nn.Module):
    """Folds slots that are not one channel's kernel offsets (the slots transposed first)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, C, 3, padding=1)
        self.fc = nn.Linear(C, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cols = F.unfold(self.a(x), 3, padding=1)  # (B, C*9, 49)
        cols = cols.unflatten(1, (C, 9)).transpose(1, 2).flatten(1, 2)  # (B, 9*C, 49): offset-major
        return self.fc(F.fold(cols, (7, 7), 3, padding=1).mean((2, 3)))


def test_fold_of_mixed_units_is_refused():
    x, y = _data(20)
    with pytest.raises(ExtractionError, match="fold adds slots of different units"):
        cn.extract.attribution(BadFold().double().eval(), (x, y), progress=False, device="cpu")


class Halo(nn.Module):
    """``Tensor.unfold`` into overlapping windows (HaloNet's halo blocks: a zero pad, then
    windows of 4 every 2 along each side), each window averaged; or the same average pool
    (``windows=False``)."""

    def __init__(self, windows: bool):
        super().__init__()
        self.windows = windows
        self.a = nn.Conv2d(3, C, 3, padding=1)
        self.b = nn.Conv2d(C, O, 1)
        self.fc = nn.Linear(O, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = F.relu(self.a(x))  # (B, C, 7, 7)
        if self.windows:
            z = F.pad(z, (1, 2, 1, 2)).unfold(2, 4, 2).unfold(3, 4, 2).mean((-1, -2))
        else:
            z = F.avg_pool2d(F.pad(z, (1, 2, 1, 2)), 4, stride=2)
        return self.fc(F.relu(self.b(z)).mean((2, 3)))


def test_tensor_unfold_windows_equal_the_pool(exact_graph, same_graph):
    torch.manual_seed(12)
    a, b = Halo(True).double().eval(), Halo(False).double().eval()
    b.load_state_dict(a.state_dict())
    x, y = _data(21)
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x), rtol=1e-12, atol=1e-12)
    same_graph(exact_graph(a, x, y, weights=False, conservation=True),
               exact_graph(b, x, y, weights=False, conservation=True), names=False)
