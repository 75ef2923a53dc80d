"""Each linearisation rule against an independent computation.

For every rule, a small model is run through ``attribution`` and, independently, through a
hand-written copy of its forward with the rule spelled out (``detach()`` on the quantity the
rule holds constant). In float64 the graph's input attribution must equal ``x * dT/dx`` of
the hand copy per input channel, every hidden unit must conserve flow, and the graph must
say it is exact. Where a rule enters edges (the layer after a gate, a shuffled input), the
edges are checked by brute force.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import connectome as cn
from connectome.errors import ExtractionError

torchvision = pytest.importorskip("torchvision")


def _flows(m: nn.Module, x: torch.Tensor, y: torch.Tensor, **kw) -> cn.Connectome:
    return cn.extract.attribution(m.double().eval(), (x, y), progress=False, device="cpu", **kw)


def _hand_input_attribution(forward, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """x * dT/dx summed per input channel, T = the target logits of the hand-linearised copy."""
    x = x.clone().requires_grad_(True)
    T = forward(x).gather(1, y[:, None]).sum()
    (g,) = torch.autograd.grad(T, x)
    return (x * g).sum((0, 2, 3)).detach().numpy()


def _assert_exact(g: cn.Connectome, rtol: float = 1e-10) -> None:
    w = g.weight.astype(np.float64)
    inflow, outflow = np.bincount(g.dst, w, g.num_nodes), np.bincount(g.src, w, g.num_nodes)
    a, b = g.node_attr("attribution"), g.node_attr("bias_attribution")
    scale = max(1.0, np.abs(a).max(), abs(g.meta["target_total"]))
    hidden = np.isin(g.node_layer, [i for i, l in enumerate(g.layers) if l.kind not in ("input", "output")])
    np.testing.assert_allclose((inflow + b)[hidden], a[hidden], rtol=0, atol=rtol * scale, err_msg="flow in")
    np.testing.assert_allclose(outflow[hidden], a[hidden], rtol=0, atol=rtol * scale, err_msg="flow out")
    assert abs(g.meta["completeness_residual"]) <= rtol * scale
    assert g.meta["exact"] is True


def _check(model: nn.Module, hand, x: torch.Tensor, y: torch.Tensor, rule: str | None) -> cn.Connectome:
    model = model.double().eval()
    g = _flows(model, x, y)
    _assert_exact(g)
    with torch.no_grad():
        T = model(x).gather(1, y[:, None]).sum().item()
    assert g.meta["target_total"] == pytest.approx(T, rel=1e-12)  # the forward pass is unchanged
    expect = _hand_input_attribution(hand, x, y)
    got = g.node_attr("attribution")[g.layer_slice("input")]
    np.testing.assert_allclose(got, expect, rtol=1e-10, atol=1e-10 * max(1.0, np.abs(expect).max()))
    if rule is not None:
        assert any(rule in r for r in g.meta["rules"]), g.meta["rules"]
    return g


def _data(seed: int, n: int = 3, c: int = 3, size: int = 6, classes: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, size, size, generator=gen, dtype=torch.float64) * 2, torch.randint(0, classes, (n,), generator=gen)


# ---------------------------------------------------------------------- gate
class SE(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.fc1, self.fc2 = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 2, 1), nn.Conv2d(2, 6, 1)
        self.conv2, self.fc = nn.Conv2d(6, 5, 3), nn.Linear(5, 4)

    def gate(self, a):
        return torch.sigmoid(self.fc2(F.relu(self.fc1(a.mean((2, 3), keepdim=True)))))

    def forward(self, x):
        a = F.relu(self.conv1(x))
        return self.fc(F.relu(self.conv2(a * self.gate(a))).mean((2, 3)))


def test_gate_rule_against_hand_linearisation():
    torch.manual_seed(0)
    m = SE().double()
    x, y = _data(1)

    def hand(x):  # signal takes all: the gate's value, not its gradient
        a = F.relu(m.conv1(x))
        return m.fc(F.relu(m.conv2(a * m.gate(a).detach())).mean((2, 3)))

    g = _check(m, hand, x, y, "gate")
    # the gate branch is in the graph but carries no flow
    for layer in ("fc1", "fc2"):
        assert np.all(g.node_attr("attribution")[g.layer_slice(layer)] == 0.0)
    # brute force: edge conv1:i -> conv2:j = sum of dT/dz_j * (conv2 applied to channel i of a*s alone)
    a = F.relu(m.conv1(x))
    u = (a * m.gate(a)).detach()
    z = m.conv2._conv_forward(u, m.conv2.weight, None).requires_grad_(True)
    T = m.fc(F.relu(z + m.conv2.bias[None, :, None, None]).mean((2, 3))).gather(1, y[:, None]).sum()
    (gz,) = torch.autograd.grad(T, z)
    E = np.zeros((5, 6))
    for i in range(6):
        ui = torch.zeros_like(u)
        ui[:, i] = u[:, i]
        E[:, i] = (gz * m.conv2._conv_forward(ui, m.conv2.weight, None)).sum((0, 2, 3)).detach().numpy()
    i, j, v = g.edge_block("conv1", "conv2")
    got = np.zeros((5, 6))
    got[j, i] = v
    np.testing.assert_allclose(got, E, rtol=1e-10, atol=1e-12)


def test_gate_on_a_one_by_one_map_is_still_a_gate():
    # at the end of a network the map is 1x1: signal and gate have the same shape
    torch.manual_seed(0)
    m = SE().double()
    x, y = _data(2, size=3)
    g = _flows(m, x, y)
    _assert_exact(g)
    # a map of 1x1 for real (the 3x3 map above takes the broadcast branch): the gate is still
    # the factor from the other operand, against the hand linearisation
    m.conv1, m.conv2 = nn.Conv2d(3, 6, 3).double(), nn.Conv2d(6, 5, 1).double()

    def hand(x):
        a = F.relu(m.conv1(x))
        return m.fc(F.relu(m.conv2(a * m.gate(a).detach())).mean((2, 3)))

    g = _check(m, hand, x, y, "gate")
    for layer in ("fc1", "fc2"):
        assert np.all(g.node_attr("attribution")[g.layer_slice(layer)] == 0.0)


def test_two_branch_product_is_a_product_layer():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.fc = nn.Conv2d(2, 3, 1), nn.Conv2d(2, 3, 1), nn.Linear(3, 2)

        def forward(self, x):
            return self.fc((self.a(x) * torch.sigmoid(self.b(x))).mean((2, 3)))

    g = cn.extract.weights(Two(), (2, 4, 4))
    assert g.layer("mul").kind == "product"


def test_quotient_of_two_data_tensors_is_refused():
    class Quotient(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.fc = nn.Conv2d(2, 3, 1), nn.Conv2d(2, 3, 1), nn.Linear(3, 2)

        def forward(self, x):
            return self.fc((self.a(x) / torch.sigmoid(self.b(x))).mean((2, 3)))

    with pytest.raises(ExtractionError, match=r"fx node 'truediv'.*division of two data tensors.*1/x") as info:
        cn.extract.weights(Quotient(), (2, 4, 4))
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------------- identity rule
def _identity(f, x):
    f0 = f(torch.zeros((), dtype=x.dtype))
    xd = x.detach()
    r = torch.where(xd != 0, (f(xd) - f0) / torch.where(xd != 0, xd, torch.ones_like(xd)), torch.zeros_like(xd))
    return f0 + x * r


SMOOTH = [nn.SiLU(), nn.GELU(), nn.Sigmoid(), nn.Tanh(), nn.Hardswish(), nn.Hardsigmoid(), nn.ELU(), nn.Softplus(),
          nn.Mish()]


@pytest.mark.parametrize("act", SMOOTH, ids=lambda a: type(a).__name__)
def test_identity_rule_against_hand_linearisation(act):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 4, 3), act, nn.Conv2d(4, 5, 3), nn.SiLU(), nn.Flatten(), nn.Linear(20, 4)).double()
    x, y = _data(3)

    def hand(x):
        h = _identity(m[1], m[0](x))
        h = _identity(F.silu, m[2](h))
        return m[5](h.flatten(1))

    g = _check(m, hand, x, y, "identity rule")
    if _identity(m[1], torch.zeros(1, dtype=torch.float64)).item() != 0:  # f(0) != 0: a bias term of every unit
        assert np.any(g.node_attr("bias_attribution")[g.layer_slice("0")] != 0)


def test_hand_written_silu_is_a_self_gate():
    torch.manual_seed(0)
    conv, fc = nn.Conv2d(3, 4, 3).double(), nn.Linear(4, 4).double()

    class Swish(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc = conv, fc

        def forward(self, x):
            h = self.conv(x)
            return self.fc((h * torch.sigmoid(h)).mean((2, 3)))

    x, y = _data(4)
    g = _check(Swish(), lambda x: fc(_identity(F.silu, conv(x)).mean((2, 3))), x, y, "gate")
    assert g.layer("conv").size == 4


# ---------------------------------------------------------------------- normalisation, channels-last
class Block(nn.Module):
    """A ConvNeXt block: depthwise conv, channels-last LayerNorm, Linear MLP with GELU, layer scale."""

    def __init__(self, c: int = 4):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 1)
        self.dw = nn.Conv2d(c, c, 3, padding=1, groups=c)
        self.norm = nn.LayerNorm(c)
        self.up, self.down = nn.Linear(c, 3 * c), nn.Linear(3 * c, c)
        self.scale = nn.Parameter(torch.linspace(-1, 2, c).reshape(c, 1, 1))
        self.fc = nn.Linear(c, 4)

    def forward(self, x):
        return self.run(x, hand=False)

    def run(self, x, hand: bool):
        s = self.stem(x)
        h = self.dw(s).permute(0, 2, 3, 1)
        if hand:
            mu, var = h.mean(-1, keepdim=True).detach(), h.var(-1, unbiased=False, keepdim=True).detach()
            h = (h - mu) / torch.sqrt(var + self.norm.eps) * self.norm.weight + self.norm.bias
            h = self.down(_identity(F.gelu, self.up(h)))
        else:
            h = self.down(F.gelu(self.up(self.norm(h))))
        h = self.scale * h.permute(0, 3, 1, 2) + s
        return self.fc(h.mean((2, 3)))


def test_layernorm_channels_last_against_hand_linearisation():
    torch.manual_seed(0)
    m = Block().double()
    with torch.no_grad():
        m.norm.weight.uniform_(-2, 2)
        m.norm.bias.uniform_(-1, 1)
    x, y = _data(5)
    g = _check(m, lambda x: m.run(x, hand=True), x, y, "normalisation")
    # the Linear over the last dim of an NHWC tensor is a layer between units, like a 1x1 conv
    assert g.layer("up").kind == "linear" and g.layer("up").size == 12
    i, j, _ = g.edge_block("dw", "up")
    assert len(i) == 4 * 12
    # weights: the Linear's matrix, and the layer scale folded into the edges of `down`
    w = cn.extract.weights(m.float(), (3, 6, 6))
    i, j, v = w.edge_block("up", "down")
    expect = m.down.weight.detach().double() * m.scale.detach().double().reshape(-1, 1)
    np.testing.assert_allclose(v, expect.numpy()[j, i], rtol=1e-6)


def test_groupnorm_against_hand_linearisation():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 6, 3), nn.GroupNorm(2, 6), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 16, 4)).double()
    with torch.no_grad():
        m[1].weight.uniform_(-2, 2)
        m[1].bias.uniform_(-1, 1)
    x, y = _data(6)

    def hand(x):
        h = m[0](x)
        n = h.shape[0]
        hg = h.reshape(n, 2, -1)
        mu, var = hg.mean(-1, keepdim=True).detach(), hg.var(-1, unbiased=False, keepdim=True).detach()
        h = ((hg - mu) / torch.sqrt(var + m[1].eps)).reshape(h.shape) * m[1].weight[:, None, None] + m[1].bias[:, None, None]
        return m[4](F.relu(h).flatten(1))

    _check(m, hand, x, y, "normalisation")


# ---------------------------------------------------------------------- constants, layouts
def test_input_normalisation_buffers_and_functional_batchnorm():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("mean", torch.tensor([0.4, -0.2, 0.1]).reshape(1, 3, 1, 1))
            self.register_buffer("std", torch.tensor([0.5, 2.0, 1.5]).reshape(1, 3, 1, 1))
            self.conv, self.fc = nn.Conv2d(3, 4, 3), nn.Linear(4, 4)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            h = self.conv((x - self.mean) / self.std)
            # timm's BatchNormAct2d calls F.batch_norm on its buffers
            h = F.batch_norm(h, self.bn.running_mean, self.bn.running_var, self.bn.weight, self.bn.bias, False, 0.1,
                             self.bn.eps)
            return self.fc(F.relu(h).mean((2, 3)))

    torch.manual_seed(0)
    m = Net().double()
    with torch.no_grad():
        m.bn.running_mean.uniform_(-1, 1)
        m.bn.running_var.uniform_(0.5, 2)
        m.bn.weight.uniform_(-2, 2)
        m.bn.bias.uniform_(-1, 1)
    x, y = _data(7)
    g = _check(m, m, x, y, None)  # exact without any rule: plain gradient x input
    assert g.meta["rules"] == []
    # F.batch_norm is folded into the weight graph like a BatchNorm module
    w = cn.extract.weights(m, (3, 6, 6))
    scale = (m.bn.weight / torch.sqrt(m.bn.running_var + m.bn.eps)).detach()
    i, j, v = w.edge_block("input", "conv")
    expect = m.conv.weight.detach().sum((2, 3)) * scale[:, None]
    np.testing.assert_allclose(v, expect.numpy()[j, i], rtol=1e-6)


class Shuffle(nn.Module):
    """A ShuffleNetV2 unit: channel split, one branch convolved, concat, channel shuffle."""

    def __init__(self):
        super().__init__()
        self.stem, self.branch, self.after, self.fc = nn.Conv2d(3, 8, 1), nn.Conv2d(4, 4, 3, padding=1), \
            nn.Conv2d(8, 8, 3, padding=1, groups=2), nn.Linear(8, 4)

    def forward(self, x):
        h = F.relu(self.stem(x))
        a, b = h.chunk(2, dim=1)
        h = torch.cat((a, F.relu(self.branch(b))), dim=1)
        n, c, hh, ww = h.size()
        h = h.view(n, 2, c // 2, hh, ww).transpose(1, 2).contiguous().view(n, c, hh, ww)
        return self.fc(F.relu(self.after(h)).mean((2, 3)))


def test_channel_split_and_shuffle_map_units():
    torch.manual_seed(0)
    m = Shuffle().double()
    x, y = _data(8)
    g = _check(m, m, x, y, None)
    # split: channels 0..3 of stem go to the concat as they are, 4..7 feed `branch`
    i, j, _ = g.edge_block("stem", "branch")
    assert sorted(set(i.tolist())) == [4, 5, 6, 7]
    i, j, _ = g.edge_block("stem", "cat")
    assert list(zip(i.tolist(), j.tolist())) == [(0, 0), (1, 1), (2, 2), (3, 3)]
    # shuffle: input channel c of `after` is unit perm[c] of the concat; grouped conv by brute force
    perm = torch.arange(8).view(2, 4).t().reshape(-1).tolist()
    w = cn.extract.weights(m, (3, 6, 6))
    i, j, v = w.edge_block("cat", "after")
    got = np.zeros((8, 8))
    got[j, i] = v
    W = m.after.weight.detach().sum((2, 3)).numpy()  # (8 out, 4 in per group)
    expect = np.zeros((8, 8))
    for o in range(8):
        for k in range(4):
            expect[o, perm[(o // 4) * 4 + k]] = W[o, k]
    np.testing.assert_allclose(got, expect, rtol=1e-6)  # weight graphs store float32


def test_stochastic_depth_in_eval_is_the_identity():
    from torchvision.ops import StochasticDepth

    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 4, 3), StochasticDepth(0.5, "row"), nn.ReLU(), nn.Flatten(), nn.Linear(64, 4)).double()
    x, y = _data(9)
    _check(m, m, x, y, None)


def test_unmapped_op_names_op_module_and_rule():
    class Soft(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv2d(3, 4, 1), nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(torch.softmax(self.conv(x), dim=1).mean((2, 3)))

    with pytest.raises(ExtractionError, match=r"fx node 'softmax'.*mixes units.*attention rule") as info:
        cn.extract.weights(Soft(), (3, 4, 4))
    assert "\n" not in str(info.value)


def test_ablating_a_channels_last_unit_zeroes_its_channel_everywhere():
    # a unit of the Linear over an NHWC tensor is a channel of its last dim, at every position
    torch.manual_seed(0)
    m = Block().double().eval()
    x, y = _data(10)
    res = cn.analysis.ablate(m, ["up:3"], (x, y), device="cpu")

    # by hand: zero channel 3 of the value `up` passes on (after its GELU)
    hook = m.up.register_forward_hook(lambda mod, inp, out: _zero_after_gelu(out, 3))
    try:
        with torch.no_grad():
            expect = m(x).gather(1, y[:, None]).mean().item()
    finally:
        hook.remove()
    assert res.logit_after == pytest.approx(expect, rel=1e-10)


def _zero_after_gelu(out, k):
    # F.gelu(out) with channel k zeroed == F.gelu of out with channel k set to 0 (gelu(0) = 0)
    out = out.clone()
    out[..., k] = 0
    return out
