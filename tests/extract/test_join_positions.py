"""``torch.cat`` along positions and ``torch.stack`` of data from different layers (PiT's and
CoaT's class token, the branches of a selective kernel): a concat layer whose operands each
fill all its units at their own positions. Its flows equal those of the same model written
with zero padding and a residual add."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import connectome as cn

C = 6


def _data(seed: int, n: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 8, 8, generator=gen, dtype=torch.float64) * 2, torch.tensor([0, 3, 1][:n])


def _compare(g1: cn.Connectome, g2: cn.Connectome) -> None:
    """Same units, edges and flows; layer names and kinds of the joining layer may differ."""
    assert [l.size for l in g1.layers] == [l.size for l in g2.layers]
    np.testing.assert_array_equal(g1.src, g2.src)
    np.testing.assert_array_equal(g1.dst, g2.dst)
    np.testing.assert_allclose(g1.weight, g2.weight, rtol=0, atol=1e-12 * max(1.0, float(np.abs(g2.weight).max())))
    # (activation statistics differ: zero padding adds positions to a padded layer's value)
    for name in ("attribution", "bias_attribution"):
        a1, a2 = g1.node_attr(name), g2.node_attr(name)
        np.testing.assert_allclose(a1, a2, rtol=0, atol=1e-12 * max(1.0, float(np.abs(a2).max())), err_msg=name)


class ClassToken(nn.Module):
    """Patch tokens and a class token computed from them by its own Linear, joined along tokens
    (``joined=True``: ``torch.cat``) or by zero padding both and adding them."""

    def __init__(self, joined: bool):
        super().__init__()
        self.joined = joined
        self.embed = nn.Conv2d(3, C, 2, stride=2)
        self.cls = nn.Linear(C, C)
        self.mix = nn.Linear(C, C)
        self.fc = nn.Linear(C, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.embed(x).flatten(2).transpose(1, 2)  # (B, 16, C)
        c = self.cls(t.mean(1, keepdim=True))  # (B, 1, C)
        if self.joined:
            z = torch.cat((c, t), dim=1)
        else:
            z = F.pad(c, (0, 0, 0, t.shape[1])) + F.pad(t, (0, 0, 1, 0))
        z = F.relu(self.mix(z))
        return self.fc(z[:, 0] + z[:, 1:].mean(1))


def test_class_token_cat_equals_padded_sum(exact_graph):
    torch.manual_seed(5)
    a, b = ClassToken(True).double().eval(), ClassToken(False).double().eval()
    b.load_state_dict(a.state_dict())
    x, y = _data(11)
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x), rtol=1e-12, atol=1e-12)
    g1 = exact_graph(a, x, y, conservation=True)
    g2 = exact_graph(b, x, y, conservation=True)
    assert g1.layers[3].kind == "concat" and g1.layers[3].name == "cat"
    _compare(g1, g2)


class Selective(nn.Module):
    """Two conv branches stacked (``torch.stack``), gated per branch and channel, summed over the
    branches (a selective kernel with sigmoid gates), or the same with the gates applied to each
    branch and a residual add (``stacked=False``)."""

    def __init__(self, stacked: bool):
        super().__init__()
        self.stacked = stacked
        self.a = nn.Conv2d(3, C, 3, padding=1)
        self.b = nn.Conv2d(3, C, 3, padding=2, dilation=2)
        self.attn = nn.Conv2d(C, 2 * C, 1)
        self.fc = nn.Linear(C, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p, q = self.a(x), self.b(x)
        n = x.shape[0]
        gate = torch.sigmoid(self.attn((p + q).mean((2, 3), keepdim=True))).view(n, 2, C, 1, 1)
        if self.stacked:
            z = (torch.stack([p, q], dim=1) * gate).sum(dim=1)  # (B, 2, C, H, W) summed over the branches
        else:
            z = p * gate[:, 0] + q * gate[:, 1]
        return self.fc(F.relu(z).mean((2, 3)))


def test_stacked_branches_equal_gated_sum(exact_graph):
    torch.manual_seed(6)
    a, b = Selective(True).double().eval(), Selective(False).double().eval()
    b.load_state_dict(a.state_dict())
    x, y = _data(12)
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x), rtol=1e-12, atol=1e-12)
    g1 = exact_graph(a, x, y, conservation=True)
    g2 = exact_graph(b, x, y, conservation=True)
    assert [(l.name, l.kind) for l in g1.layers][5] == ("stack", "concat")
    _compare(g1, g2)


class SameLayer(nn.Module):
    """Tokens of one layer joined in another order: a layout op (a roll)."""

    def __init__(self, joined: bool):
        super().__init__()
        self.joined = joined
        self.embed = nn.Conv2d(3, C, 2, stride=2)
        self.fc = nn.Linear(C * 16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.embed(x).flatten(2)  # (B, C, 16)
        t = torch.cat((t[..., 5:], t[..., :5]), -1) if self.joined else torch.roll(t, -5, -1)
        return self.fc(t.flatten(1))


def test_cat_of_one_layer_along_positions_is_a_layout(exact_graph):
    torch.manual_seed(7)
    a, b = SameLayer(True).double().eval(), SameLayer(False).double().eval()
    b.load_state_dict(a.state_dict())
    x, y = _data(13)
    g1, g2 = exact_graph(a, x, y), exact_graph(b, x, y)
    assert [l.name for l in g1.layers] == [l.name for l in g2.layers] == ["input", "embed", "logits"]
    _compare(g1, g2)


class Registers(nn.Module):
    """DINOv2 with registers: learned register tokens put between the class token and the
    patches, ``cat((z[:, :1], registers, z[:, 1:]))``: two slices of one tensor and a constant."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Conv2d(3, C, 2, stride=2)
        self.cls = nn.Parameter(torch.randn(1, 1, C))
        self.registers = nn.Parameter(torch.randn(1, 2, C))
        self.mix = nn.Linear(C, C)
        self.fc = nn.Linear(C, 4)
        self.z = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.embed(x).flatten(2).transpose(1, 2)
        t = torch.cat((self.cls.expand(t.shape[0], -1, -1), t), dim=1)
        z = torch.cat((t[:, :1], self.registers.expand(t.shape[0], -1, -1), t[:, 1:]), dim=1)
        self.z = z
        return self.fc(self.mix(z).mean(1))


def test_constants_between_slices_of_one_tensor_are_a_bias_of_its_units(exact_graph):
    torch.manual_seed(6)
    m = Registers().double().eval()
    x, y = _data(12)
    g = exact_graph(m, x, y, conservation=True)
    # the model is linear: the input's attribution is x * dT/dx, and the embedding's bias
    # attribution holds its bias, the class token and the registers, each value * dT/dz
    x1 = x.clone().requires_grad_(True)
    out = m(x1)
    m.z.retain_grad()
    out.gather(1, y[:, None]).sum().backward()
    np.testing.assert_allclose(g.node_attr("attribution", "input"), (x1 * x1.grad).sum((0, 2, 3)).detach().numpy(),
                               rtol=1e-10, atol=1e-12)
    gz = m.z.grad
    expect = (gz[:, 0] * m.cls[0, 0]).sum(0) + (gz[:, 1:3] * m.registers[0]).sum((0, 1)) + \
        (gz[:, 3:] * m.embed.bias).sum((0, 1))
    np.testing.assert_allclose(g.node_attr("bias_attribution", "embed"), expect.detach().numpy(), rtol=1e-10, atol=1e-12)
