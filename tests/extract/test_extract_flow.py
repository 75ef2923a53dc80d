"""Attribution flows: conservation and completeness on random and real architectures, each edge
against a brute-force computation, targets, per-sample flows, categories, contraction, and the
caller's model left as found."""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from connectome.errors import ConnectomeError, DataError
from connectome.extract import attribution, attribution_by_category
from connectome.graph import Connectome

torchvision = pytest.importorskip("torchvision")


# ---------------------------------------------------------------------- invariants
def flows(g: Connectome) -> tuple[np.ndarray, np.ndarray]:
    w = g.weight.astype(np.float64)
    return np.bincount(g.dst, w, g.num_nodes), np.bincount(g.src, w, g.num_nodes)


def flow_scale(g: Connectome) -> float:
    A, B = g.node_attr("attribution"), g.node_attr("bias_attribution")
    return max(np.abs(g.weight).max(initial=0.0), np.abs(A).max(), np.abs(B).max(), abs(g.meta["target_total"]), 1e-300)


def assert_conserved(g: Connectome, rtol: float = 1e-9) -> None:
    """Every unit: flow in + bias term == attribution == flow out (input: no flow in; logits: no flow out)."""
    inflow, outflow = flows(g)
    A, B = g.node_attr("attribution"), g.node_attr("bias_attribution")
    atol = rtol * flow_scale(g)
    for l in g.layers:
        sl = g.layer_slice(l.name)
        if l.kind == "input":
            np.testing.assert_array_equal(B[sl], 0.0)
        else:
            np.testing.assert_allclose(inflow[sl] + B[sl], A[sl], rtol=0, atol=atol, err_msg=f"flow into {l.name}")
        if l.name != "logits":
            np.testing.assert_allclose(outflow[sl], A[sl], rtol=0, atol=atol, err_msg=f"flow out of {l.name}")


def assert_complete(g: Connectome, rtol: float = 1e-6, residual: float = 1e-9) -> None:
    """Input attribution + every bias term == the target total, and the residual says so."""
    T = g.meta["target_total"]
    A, B = g.node_attr("attribution"), g.node_attr("bias_attribution")
    scale = flow_scale(g)
    assert A[g.layer_slice(g.layers[0].name)].sum() + B.sum() == pytest.approx(T, rel=rtol, abs=1e-12 * scale)
    assert A[g.layer_slice("logits")].sum() == pytest.approx(T, rel=rtol, abs=1e-12 * scale)
    assert abs(g.meta["completeness_residual"]) <= residual * scale
    assert g.meta["exact"] is True and g.meta["nonlinear_ops"] == []


def dense(g: Connectome, src: str, dst: str, attr: str = "weight") -> np.ndarray:
    """Edges ``src -> dst`` as a (dst units, src units) matrix, 0 where there is no edge."""
    i, j, v = g.edge_block(src, dst, attr)
    out = np.zeros((g.layer(dst).size, g.layer(src).size))
    out[j, i] = v
    return out


def run(model, x, y=None, **kw) -> Connectome:
    kw.setdefault("progress", False)
    return attribution(model, (x, y) if y is not None else x, **kw)


# ---------------------------------------------------------------------- random architectures
@dataclass(frozen=True)
class BlockSpec:
    out: int
    kernel: int
    stride: int
    dilation: int
    groups: int
    bias: bool
    bn: str  # none | conv (before the add) | add (after the add) | post (after the activation)
    act: str  # relu | relu6
    inplace: bool
    residual: bool
    concat: int  # channels of a parallel 1x1 branch concatenated to the output (0: none)
    pool: str | None  # max | avg


@dataclass(frozen=True)
class NetSpec:
    c_in: int
    size: int
    blocks: tuple[BlockSpec, ...]
    head: str  # gap | adaptive_avg | adaptive_max | flatten
    hidden: int | None
    classes: int


@st.composite
def net_specs(draw) -> NetSpec:
    c = c_in = draw(st.integers(1, 3))
    size = size0 = draw(st.integers(4, 7))
    blocks = []
    for _ in range(draw(st.integers(1, 3))):
        residual = draw(st.booleans())
        out = c if residual else draw(st.integers(1, 5))
        divisors = [d for d in range(1, math.gcd(c, out) + 1) if c % d == 0 and out % d == 0]
        groups = draw(st.sampled_from(divisors))
        kernel = draw(st.sampled_from([1, 3]))
        stride = 1 if residual or size < 3 else draw(st.sampled_from([1, 2]))
        dilation = draw(st.sampled_from([1, 2])) if kernel == 3 else 1
        pool = draw(st.sampled_from([None, "max", "avg"])) if size >= 4 and stride == 1 else None
        blocks.append(BlockSpec(
            out=out, kernel=kernel, stride=stride, dilation=dilation, groups=groups, bias=draw(st.booleans()),
            bn=draw(st.sampled_from(["none", "conv", "add", "post"])), act=draw(st.sampled_from(["relu", "relu6"])),
            inplace=draw(st.booleans()), residual=residual, concat=draw(st.sampled_from([0, 0, 1, 2])), pool=pool,
        ))
        c = out + blocks[-1].concat
        size = (size - 1) // stride + 1
        if pool:
            size //= 2
    return NetSpec(c_in=c_in, size=size0, blocks=tuple(blocks),
                   head=draw(st.sampled_from(["gap", "adaptive_avg", "adaptive_max", "flatten"])),
                   hidden=draw(st.none() | st.integers(2, 4)), classes=draw(st.integers(2, 5)))


class Block(nn.Module):
    def __init__(self, c: int, s: BlockSpec):
        super().__init__()
        self.s = s
        pad = s.dilation * (s.kernel // 2)
        self.conv = nn.Conv2d(c, s.out, s.kernel, stride=s.stride, padding=pad, dilation=s.dilation,
                              groups=s.groups, bias=s.bias)
        self.bn = nn.BatchNorm2d(s.out) if s.bn != "none" else None
        self.act = nn.ReLU(inplace=s.inplace) if s.act == "relu" else nn.ReLU6(inplace=s.inplace)
        self.branch = nn.Conv2d(c, s.concat, 1, stride=s.stride) if s.concat else None
        self.pool = {"max": nn.MaxPool2d(2), "avg": nn.AvgPool2d(2), None: None}[s.pool]

    def forward(self, x):
        h = self.conv(x)
        if self.s.bn == "conv":
            h = self.bn(h)
        if self.s.residual:
            h = h + x
        if self.s.bn == "add":
            h = self.bn(h)
        h = self.act(h)
        if self.s.bn == "post":
            h = self.bn(h)
        if self.branch is not None:
            h = torch.cat([h, F.relu(self.branch(x))], dim=1)
        if self.pool is not None:
            h = self.pool(h)
        return h


class RandomNet(nn.Module):
    def __init__(self, spec: NetSpec):
        super().__init__()
        self.spec = spec
        blocks, c = [], spec.c_in
        for b in spec.blocks:
            blocks.append(Block(c, b))
            c = b.out + b.concat
        self.blocks = nn.ModuleList(blocks)
        self.pool = {"adaptive_avg": nn.AdaptiveAvgPool2d(2), "adaptive_max": nn.AdaptiveMaxPool2d(2)}.get(spec.head)
        with torch.no_grad():
            feat = self._features(torch.zeros(1, spec.c_in, spec.size, spec.size)).shape[1]
        self.hidden = nn.Linear(feat, spec.hidden) if spec.hidden else None
        self.fc = nn.Linear(spec.hidden or feat, spec.classes)

    def _features(self, x):
        for b in self.blocks:
            x = b(x)
        if self.spec.head == "gap":
            return x.mean((2, 3))
        if self.pool is not None:
            x = self.pool(x)
        return torch.flatten(x, 1)

    def forward(self, x):
        x = self._features(x)
        if self.hidden is not None:
            x = F.relu(self.hidden(x))
        return self.fc(x)


def randomize(model: nn.Module, seed: int, gain: float = 1.5) -> nn.Module:
    """Random float64 weights, biases and BatchNorm statistics (gamma may be negative)."""
    gen = torch.Generator().manual_seed(seed)
    model = model.double().eval()

    def rnd(shape, std=1.0, mean=0.0):
        return torch.randn(shape, generator=gen, dtype=torch.float64) * std + mean

    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d | nn.Linear):
                fan_in = m.weight[0].numel()
                m.weight.copy_(rnd(m.weight.shape, gain / math.sqrt(fan_in)))
                if m.bias is not None:
                    m.bias.copy_(rnd(m.bias.shape, 0.5))
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(rnd(m.weight.shape, 0.5, 1.0))
                m.bias.copy_(rnd(m.bias.shape, 0.5))
                m.running_mean.copy_(rnd(m.running_mean.shape, 0.5))
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen, dtype=torch.float64) * 1.5 + 0.5)
    return model


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(spec=net_specs(), seed=st.integers(0, 2**31 - 1), n=st.integers(1, 3), batch_size=st.integers(1, 3),
       scale=st.floats(0.5, 8.0))
def test_random_architectures_conserve_flow(spec, seed, n, batch_size, scale):
    model = randomize(RandomNet(spec), seed)
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(n, spec.c_in, spec.size, spec.size, generator=gen, dtype=torch.float64) * scale
    y = torch.randint(0, spec.classes, (n,), generator=gen)
    g = run(model, x, y, per_sample=True, batch_size=batch_size)
    assert g.meta["n_images"] == n
    with torch.no_grad():
        expected_total = model(x).gather(1, y[:, None]).sum().item()
    assert g.meta["target_total"] == pytest.approx(expected_total, rel=1e-9, abs=1e-12)
    assert_conserved(g)
    assert_complete(g)
    # Per-sample flows: |E| summed per image bounds |sum E|, with equality for a single image.
    atol = 1e-9 * flow_scale(g)
    absw = g.edge_attr("abs_weight")
    assert np.all(absw >= np.abs(g.weight) - atol)
    per_image = [run(model, x[i : i + 1], y[i : i + 1], per_sample=True) for i in range(n)]
    for gi in per_image:
        assert np.array_equal(gi.src, g.src) and np.array_equal(gi.dst, g.dst)
        np.testing.assert_allclose(gi.edge_attr("abs_weight"), np.abs(gi.weight), rtol=0, atol=atol)
    np.testing.assert_allclose(sum(gi.weight for gi in per_image), g.weight, rtol=0, atol=atol)
    np.testing.assert_allclose(sum(np.abs(gi.weight) for gi in per_image), absw, rtol=0, atol=atol)


def test_relu6_saturation_is_a_bias_term():
    # One unit, ReLU6 saturated everywhere: its output is the constant 6, so all of its
    # attribution is a bias term and nothing flows in from the input.
    model = nn.Sequential(nn.Conv2d(1, 1, 1), nn.ReLU6(), nn.Flatten(), nn.Linear(4, 1)).double().eval()
    with torch.no_grad():
        model[0].weight.fill_(1.0)
        model[0].bias.fill_(0.0)
        model[3].weight.fill_(0.5)
        model[3].bias.fill_(0.25)
    x = torch.full((1, 1, 2, 2), 10.0, dtype=torch.float64)
    g = run(model, x, torch.tensor([0]))
    assert g.meta["target_total"] == pytest.approx(4 * 6 * 0.5 + 0.25, rel=1e-12)
    assert g.node_attr("attribution", "0")[0] == pytest.approx(12.0, rel=1e-12)
    assert g.node_attr("bias_attribution", "0")[0] == pytest.approx(12.0, rel=1e-12)
    assert g.node_attr("attribution", "input")[0] == pytest.approx(0.0, abs=1e-12)
    assert g.node_attr("bias_attribution", "logits")[0] == pytest.approx(0.25, rel=1e-12)
    assert_conserved(g)
    assert_complete(g)


def test_hand_worked_linear_flows():
    # T = w2 * relu(w1 . x + b1) + b2 with every unit active: E = W * dT/dW by hand.
    model = nn.Sequential(nn.Linear(2, 1), nn.ReLU(), nn.Linear(1, 1)).double().eval()
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[2.0, -1.0]]))
        model[0].bias.fill_(0.5)
        model[2].weight.fill_(3.0)
        model[2].bias.fill_(-1.0)
    x = torch.tensor([[1.0, 0.5]], dtype=torch.float64)
    g = run(model, x, torch.tensor([0]))
    # h = 2 - 0.5 + 0.5 = 2; T = 6 - 1 = 5
    assert g.meta["target_total"] == pytest.approx(5.0)
    np.testing.assert_allclose(dense(g, "input", "0"), [[2.0 * 3, -0.5 * 3]], rtol=1e-12)
    np.testing.assert_allclose(dense(g, "0", "logits"), [[6.0]], rtol=1e-12)
    np.testing.assert_allclose(g.node_attr("bias_attribution"), [0, 0, 1.5, -1.0], rtol=1e-12)
    np.testing.assert_allclose(g.node_attr("attribution"), [6.0, -1.5, 6.0, 5.0], rtol=1e-12)


def test_residual_sub_conserves_flow():
    class Sub(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1 = nn.Conv2d(2, 3, 3, padding=1)
            self.c2 = nn.Conv2d(3, 3, 3, padding=1)
            self.fc = nn.Linear(3, 2)

        def forward(self, x):
            a = F.relu(self.c1(x))
            return self.fc(F.relu(a - self.c2(a)).mean((2, 3)))

    model = randomize(Sub(), 0)
    x = torch.randn(3, 2, 5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert_conserved(run(model, x, torch.tensor([0, 1, 0])))


# ---------------------------------------------------------------------- brute force, edge by edge
class Zoo(nn.Module):
    """Strided, dilated, reflect-padded, grouped and BN-followed convs, a residual add, a concat,
    a flatten into a Linear and a Linear into a Linear; identity taps expose the add and concat."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.bn0 = nn.BatchNorm2d(4)
        self.grp = nn.Conv2d(4, 4, 3, padding=2, dilation=2, groups=2, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.refl = nn.Conv2d(4, 2, 3, padding=1, padding_mode="reflect")
        self.side = nn.Conv2d(4, 3, 1)
        self.fc1 = nn.Linear(5 * 2 * 2, 6)
        self.fc2 = nn.Linear(6, 3)
        self.tap_a, self.tap_b, self.tap_add = nn.Identity(), nn.Identity(), nn.Identity()
        self.tap_c, self.tap_d, self.tap_cat = nn.Identity(), nn.Identity(), nn.Identity()

    def forward(self, x):
        a = F.relu(self.bn0(self.stem(x)))
        s = self.tap_add(self.tap_a(a) + self.tap_b(self.bn1(self.grp(a))))
        s = F.relu(s)
        c = torch.cat([self.tap_c(F.relu(self.refl(s))), self.tap_d(F.relu(self.side(s)))], dim=1)
        c = F.max_pool2d(self.tap_cat(c), 2)
        return self.fc2(F.relu(self.fc1(torch.flatten(c, 1))))


def capture(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, dict[str, torch.Tensor]]:
    """Each module's input and the gradient of T at its output, by hooks on a copy of the model."""
    model = copy.deepcopy(model)
    caps: dict[str, dict[str, torch.Tensor]] = {}
    handles = []
    for name, m in model.named_modules():
        if not name:
            continue

        def hook(mod, inp, out, name=name):
            caps[name] = {"x": inp[0].detach().clone(), "y": out.detach().clone()}
            out.register_hook(lambda g: caps[name].__setitem__("g", g.detach().clone()))

        handles.append(m.register_forward_hook(hook))
    x = x.clone().requires_grad_(True)
    T = model(x).gather(1, y[:, None]).sum()
    torch.autograd.grad(T, x)
    for h in handles:
        h.remove()
    return caps


def brute_force_edges(m: nn.Module, x: torch.Tensor, g: torch.Tensor, units: int) -> np.ndarray:
    """E[j, i] = sum over images and positions of g_j * (layer applied to input unit i alone, no bias)."""
    out = np.zeros((g.shape[1], units))
    for i in range(units):
        xi = torch.zeros_like(x)
        if isinstance(m, nn.Conv2d):
            xi[:, i] = x[:, i]
            z = m._conv_forward(xi, m.weight, None)
        else:
            p = x.shape[1] // units
            xi[:, i * p : (i + 1) * p] = x[:, i * p : (i + 1) * p]
            z = F.linear(xi, m.weight)
        out[:, i] = (g * z).reshape(g.shape[0], g.shape[1], -1).sum((0, 2)).detach().numpy()
    return out


@pytest.fixture(scope="module")
def zoo():
    model = randomize(Zoo(), 7)
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(3, 3, 8, 8, generator=gen, dtype=torch.float64) * 2
    y = torch.tensor([0, 2, 1])
    return model, x, y


def test_edges_equal_brute_force(zoo):
    model, x, y = zoo
    g = run(model, x, y, per_sample=True)
    caps = capture(model, x, y)
    blocks = {  # module: (source layer, destination layer) in the graph
        "stem": ("input", "stem"), "grp": ("stem", "grp"), "refl": ("add", "refl"), "side": ("add", "side"),
        "fc1": ("cat", "fc1"), "fc2": ("fc1", "logits"),
    }
    scale = flow_scale(g)
    for mod, (src, dst) in blocks.items():
        m = dict(model.named_modules())[mod]
        c = caps[mod]
        E = brute_force_edges(m, c["x"], c["g"], g.layer(src).size)
        np.testing.assert_allclose(dense(g, src, dst), E, rtol=1e-9, atol=1e-12 * scale, err_msg=mod)
        # Grouped conv: no edge where the groups do not connect, and the brute force agrees it is 0.
        i, j, _ = g.edge_block(src, dst)
        missing = np.ones_like(E, dtype=bool)
        missing[j, i] = False
        assert np.all(E[missing] == 0.0), mod
        if mod == "grp":
            assert missing.sum() == 8  # 4 outputs x 2 inputs of the other group
        # Per-sample: the sum over images of |E per image|.
        absE = sum(np.abs(brute_force_edges(m, c["x"][k : k + 1], c["g"][k : k + 1], g.layer(src).size))
                   for k in range(x.shape[0]))
        np.testing.assert_allclose(dense(g, src, dst, "abs_weight"), absE, rtol=1e-9, atol=1e-12 * scale, err_msg=mod)
    # Identity edges: operand value times the gradient at the add / concat output.
    for tap, dst, offset in (("tap_a", "add", 0), ("tap_b", "add", 0), ("tap_c", "cat", 0), ("tap_d", "cat", 2)):
        src = {"tap_a": "stem", "tap_b": "grp", "tap_c": "refl", "tap_d": "side"}[tap]
        xo = caps[tap]["y"]
        go = caps["tap_add" if dst == "add" else "tap_cat"]["g"][:, offset : offset + xo.shape[1]]
        expect = (xo * go).sum((0, 2, 3)).numpy()
        got = dense(g, src, dst)[offset : offset + xo.shape[1]]
        np.testing.assert_allclose(np.diag(got), expect, rtol=1e-9, atol=1e-12 * scale, err_msg=tap)
    assert_conserved(g)
    assert_complete(g)


def test_bn_folding_leaves_w_times_dw_unchanged(zoo):
    # stem is followed by bn0: the graph edges are W * dT/dW of the raw conv, not of a folded one.
    model, x, y = zoo
    g = run(model, x, y)
    caps = capture(model, x, y)
    m = model.stem
    w = m.weight.detach().clone().requires_grad_(True)
    z = m._conv_forward(caps["stem"]["x"], w, None)
    (dw,) = torch.autograd.grad((z * caps["stem"]["g"]).sum(), w)
    np.testing.assert_allclose(dense(g, "input", "stem"), (w * dw).sum((2, 3)).detach().numpy(), rtol=1e-9, atol=1e-14)


@pytest.mark.parametrize("batch_size", [64, 1])
def test_node_statistics(zoo, batch_size):
    # all layers' statistics are added at once per batch (one flat buffer): one batch, and
    # one image per batch (the max and the sums across batches)
    model, x, y = zoo
    g = run(model, x, y, batch_size=batch_size)
    caps = capture(model, x, y)
    # The stem's units pass on relu(bn0(conv)): spatial mean per image, then mean/std/max/frequency.
    a = F.relu(caps["bn0"]["y"]).mean((2, 3)).numpy()
    np.testing.assert_allclose(g.node_attr("activation_mean", "stem"), a.mean(0), rtol=1e-9)
    np.testing.assert_allclose(g.node_attr("activation_std", "stem"), a.std(0), rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(g.node_attr("activation_max", "stem"), a.max(0), rtol=1e-9)
    np.testing.assert_allclose(g.node_attr("frequency", "stem"), (a > 0).mean(0))
    logits = model(x).detach().numpy()
    np.testing.assert_allclose(g.node_attr("activation_mean", "logits"), logits.mean(0), rtol=1e-9)
    np.testing.assert_allclose(g.node_attr("activation_mean", "input"), x.mean((2, 3)).mean(0).numpy(), rtol=1e-9)
    assert g.meta["n_images"] == 3 and g.meta["method"] == "attribution"


def test_per_sample_sums_over_images(zoo):
    model, x, y = zoo
    g = run(model, x, y, per_sample=True, batch_size=2)
    plain = run(model, x, y)
    # per_sample adds a column and changes nothing else (up to summation order)
    np.testing.assert_allclose(g.weight, plain.weight, rtol=1e-12, atol=1e-14 * flow_scale(g))
    assert "abs_weight" not in plain.edge_attrs and plain.meta["per_sample"] is False
    singles = [run(model, x[k : k + 1], y[k : k + 1]) for k in range(3)]
    atol = 1e-10 * flow_scale(g)
    np.testing.assert_allclose(sum(s.weight for s in singles), g.weight, rtol=0, atol=atol)
    np.testing.assert_allclose(sum(np.abs(s.weight) for s in singles), g.edge_attr("abs_weight"), rtol=0, atol=atol)
    for attr in ("attribution", "bias_attribution"):
        np.testing.assert_allclose(sum(s.node_attr(attr) for s in singles), g.node_attr(attr), rtol=0, atol=atol)


def test_batches_do_not_change_the_result(zoo):
    model, x, y = zoo
    a = run(model, x, y, batch_size=1)
    b = run(model, x, y, batch_size=64)
    assert a.layers == b.layers and np.array_equal(a.src, b.src) and np.array_equal(a.dst, b.dst)
    atol = 1e-12 * flow_scale(b)
    np.testing.assert_allclose(a.weight, b.weight, rtol=1e-12, atol=atol)
    for k in b.node_attrs:
        np.testing.assert_allclose(a.node_attr(k), b.node_attr(k), rtol=1e-12, atol=atol, err_msg=k)
    assert a.meta["target_total"] == pytest.approx(b.meta["target_total"], rel=1e-12)


def test_default_device_without_gpu(zoo):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: device=None picks it")
    model, x, y = zoo
    assert run(model, x, y).meta["device"] == "cpu"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(zoo):
    model, x, y = zoo
    cpu = run(model, x, y, device="cpu", per_sample=True)
    gpu = run(model, x, y, device="cuda", per_sample=True)
    assert next(model.parameters()).device.type == "cpu"  # the caller's model never moves
    assert gpu.meta["device"].startswith("cuda")
    atol = 1e-9 * flow_scale(cpu)
    np.testing.assert_allclose(gpu.weight, cpu.weight, rtol=1e-9, atol=atol)
    np.testing.assert_allclose(gpu.edge_attr("abs_weight"), cpu.edge_attr("abs_weight"), rtol=1e-9, atol=atol)
    for k in cpu.node_attrs:
        np.testing.assert_allclose(gpu.node_attr(k), cpu.node_attr(k), rtol=1e-9, atol=atol, err_msg=k)
    assert_conserved(gpu)
    assert_complete(gpu)


# ---------------------------------------------------------------------- torchvision
def _tv(name, **kw):
    return lambda: getattr(torchvision.models, name)(weights=None, **kw)


TORCHVISION = [
    pytest.param(_tv("resnet18"), id="resnet18"),
    pytest.param(_tv("densenet121"), id="densenet121", marks=pytest.mark.slow),
    pytest.param(_tv("googlenet", init_weights=False), id="googlenet", marks=pytest.mark.slow),
    pytest.param(_tv("mobilenet_v2"), id="mobilenet_v2", marks=pytest.mark.slow),  # float64 depthwise backward is slow on CPU
    pytest.param(_tv("vgg11"), id="vgg11", marks=pytest.mark.slow),
    # beyond the list: grouped convolutions, and squeeze's ceil-mode pooling
    pytest.param(_tv("regnet_x_400mf"), id="regnet_x_400mf", marks=pytest.mark.slow),
    pytest.param(_tv("squeezenet1_0"), id="squeezenet1_0"),
]


@pytest.mark.parametrize("build", TORCHVISION)
def test_torchvision_conservation_and_completeness(build):
    torch.manual_seed(0)
    model = build().eval().double()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 32, 32, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 1000, (2,), generator=gen)
    g = run(model, x, y)
    with torch.no_grad():
        T = model(x).gather(1, y[:, None]).sum().item()
    assert g.meta["target_total"] == pytest.approx(T, rel=1e-9)
    assert g.layer("logits").size == 1000
    assert_conserved(g, rtol=1e-9)
    assert_complete(g, rtol=1e-6)


def test_smooth_activation_is_exact_by_the_identity_rule():
    # before the identity rule a SiLU left a completeness gap of about 1e-2; now it is exact
    model = randomize(nn.Sequential(nn.Conv2d(2, 3, 3), nn.SiLU(), nn.Flatten(), nn.Linear(12, 2)), 0)
    x = torch.randn(2, 2, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 3
    g = run(model, x, torch.tensor([0, 1]))
    assert g.meta["exact"] is True
    assert len(g.meta["nonlinear_ops"]) == 1  # the fx node of the SiLU
    assert any("identity rule" in r for r in g.meta["rules"])
    assert_conserved(g, rtol=1e-9)
    assert g.meta["completeness_relative"] < 1e-12


# ---------------------------------------------------------------------- targets
@pytest.fixture(scope="module")
def small():
    model = randomize(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
                                    nn.Flatten(), nn.Linear(4 * 3 * 3, 3)), 5)
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(4, 3, 8, 8, generator=gen, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 1])
    with torch.no_grad():
        logits = model(x)
    return model, x, y, logits


@pytest.mark.parametrize(
    "target, expect, target_class",
    [
        ("label", lambda L, y: L.gather(1, y[:, None]).sum(), None),
        ("predicted", lambda L, y: L.max(1).values.sum(), None),
        (2, lambda L, y: L[:, 2].sum(), 2),
        ("1", lambda L, y: L[:, 1].sum(), 1),
        ("dog", lambda L, y: L[:, 1].sum(), 1),
        (lambda L: L[:, 0] - L[:, 2], lambda L, y: (L[:, 0] - L[:, 2]).sum(), None),
    ],
    ids=["label", "predicted", "int", "digit-string", "class-name", "callable"],
)
def test_targets(small, target, expect, target_class):
    model, x, y, logits = small
    g = run(model, x, y, target=target, labels=["cat", "dog", "eel"])
    assert g.meta["target_total"] == pytest.approx(float(expect(logits, y)), rel=1e-12)
    assert g.meta["target_class"] == target_class
    assert g.layer("logits").labels == ("cat", "dog", "eel")
    assert_conserved(g)
    assert_complete(g)


@pytest.mark.parametrize(
    "target, err, phrase",
    [
        (3, DataError, "target class 3 does not exist; the output layer has 3 units"),
        (-1, DataError, "does not exist"),
        ("zebra", DataError, "target 'zebra' is not 'label'.*classes"),
        (True, DataError, "target must be"),
        (lambda L: L, ConnectomeError, "one value per image"),
    ],
)
def test_bad_targets(small, target, err, phrase):
    model, x, y, _ = small
    with pytest.raises(err, match=phrase):
        run(model, x, y, target=target, labels=["cat", "dog", "eel"])


def test_float32_model(small):
    model, x, y, _ = small
    m32 = copy.deepcopy(model).float()
    g = run(m32, x.float(), y)
    g64 = run(model, x, y)
    assert g.meta["dtype"] == "float32"
    # float32 forward/backward: identities hold to float32 precision (edges are accumulated in float64)
    assert_conserved(g, rtol=1e-5)
    assert_complete(g, rtol=1e-5, residual=1e-5)
    np.testing.assert_allclose(g.weight, g64.weight, rtol=1e-3, atol=1e-5 * flow_scale(g64))


def test_contracted_layers_keep_completeness(zoo):
    model, x, y = zoo
    full = run(model, x, y)
    g = run(model, x, y, layers=["stem", "add", "fc1"])
    assert g.layer_names == ["input", "stem", "add", "fc1", "logits"]
    assert g.meta["contracted_to"] == g.layer_names
    inflow, _ = flows(g)
    inflow_full, _ = flows(full)
    last, last_full = g.layer_slice("logits"), full.layer_slice("logits")
    B, Bf = g.node_attr("bias_attribution"), full.node_attr("bias_attribution")
    atol = 1e-9 * flow_scale(full)
    np.testing.assert_allclose(inflow[last] + B[last], inflow_full[last_full] + Bf[last_full], rtol=0, atol=atol)
    assert_conserved(g)
    assert_complete(g)
    with pytest.raises(ConnectomeError, match="no layer 'nope' to contract onto"):
        run(model, x, y, layers=["nope"])


# ---------------------------------------------------------------------- categories
@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for ci, cname in enumerate(["ant", "bee", "cow"]):
        (root / cname).mkdir()
        for k in range(2 + ci):
            arr = rng.integers(0, 256, size=(36, 40, 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / cname / f"{k}.png")
    return root


@pytest.fixture(scope="module")
def folder_model():
    return randomize(nn.Sequential(nn.Conv2d(3, 4, 5, stride=2), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 5, 3),
                                   nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 3)), 11)


def transform32():
    from torchvision import transforms

    return transforms.Compose([transforms.Resize(32), transforms.CenterCrop(32), transforms.ToTensor()])


def test_attribution_by_category(image_folder, folder_model):
    graphs = attribution_by_category(folder_model, image_folder, transform=transform32(), batch_size=2, progress=False)
    assert list(graphs) == ["ant", "bee", "cow"]
    for k, (name, g) in enumerate(graphs.items()):
        assert g.meta["category"] == name and g.meta["target_class"] == k
        assert g.meta["n_images"] == 2 + k
        assert g.layer("logits").labels == ("ant", "bee", "cow")
        assert_conserved(g)
        assert_complete(g)
    whole = attribution(folder_model, image_folder, transform=transform32(), batch_size=4, progress=False)
    assert whole.meta["n_images"] == 9
    atol = 1e-9 * flow_scale(whole)
    np.testing.assert_allclose(sum(g.weight for g in graphs.values()), whole.weight, rtol=0, atol=atol)
    for attr in ("attribution", "bias_attribution"):
        np.testing.assert_allclose(sum(g.node_attr(attr) for g in graphs.values()), whole.node_attr(attr), rtol=0, atol=atol)
    assert sum(g.meta["target_total"] for g in graphs.values()) == pytest.approx(whole.meta["target_total"], rel=1e-9)


@pytest.mark.parametrize("max_images", [None, 1])
def test_categories_are_read_by_one_loader_in_turn(image_folder, folder_model, monkeypatch, max_images):
    """The categories of a run share one loader (its decoding processes start once, not once
    per category); with max_images each category has a loader of its own (the shared one would
    decode the images left over); either way a category is the same as computed alone."""
    from torch.utils.data import DataLoader

    starts = []
    iter_ = DataLoader.__iter__
    monkeypatch.setattr(DataLoader, "__iter__", lambda self: starts.append(1) or iter_(self))
    kw = dict(transform=transform32(), batch_size=1, max_images=max_images, num_workers=1, progress=False)
    graphs = attribution_by_category(folder_model, image_folder, **kw)
    assert len(starts) == (1 if max_images is None else len(graphs))
    for k, (name, g) in enumerate(graphs.items()):
        assert g.meta["n_images"] == (2 + k if max_images is None else 1)
        alone = attribution_by_category(folder_model, image_folder, categories=[name], **kw)[name]
        np.testing.assert_array_equal(g.weight, alone.weight)
        np.testing.assert_array_equal(g.node_attr("attribution"), alone.node_attr("attribution"))


def test_attribution_by_category_subset_and_kwargs(image_folder, folder_model):
    graphs = attribution_by_category(folder_model, image_folder, transform=transform32(), categories=["cow"],
                                     per_sample=True, progress=False)
    assert list(graphs) == ["cow"]
    assert "abs_weight" in graphs["cow"].edge_attrs
    with pytest.raises(DataError, match=r"categories \['yak'\] are not in the data"):
        attribution_by_category(folder_model, image_folder, transform=transform32(), categories=["yak"], progress=False)


def test_attribution_by_category_on_tensors(small):
    model, x, y, _ = small
    graphs = attribution_by_category(model, (x, y), progress=False)
    assert list(graphs) == ["0", "1", "2"]
    assert [g.meta["n_images"] for g in graphs.values()] == [1, 2, 1]
    whole = run(model, x, y)
    np.testing.assert_allclose(sum(g.weight for g in graphs.values()), whole.weight, rtol=0,
                               atol=1e-9 * flow_scale(whole))


# ---------------------------------------------------------------------- the caller's model
class InPlace(nn.Module):
    """In-place ops everywhere: module ReLU(inplace), F.relu(inplace), x.relu_(), and `+=`."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(2, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.act = nn.ReLU(inplace=True)
        self.c2 = nn.Conv2d(3, 3, 3, padding=1)
        self.c3 = nn.Conv2d(3, 3, 1)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        a = self.act(self.bn(self.c1(x)))
        b = self.c2(a)
        b += a
        b = F.relu(b, inplace=True)
        c = self.c3(b).relu_()
        return self.fc(self.drop(c).mean((2, 3)))


class OutOfPlace(InPlace):
    def forward(self, x):
        a = F.relu(self.bn(self.c1(x)))
        b = F.relu(self.c2(a) + a)
        c = F.relu(self.c3(b))
        return self.fc(self.drop(c).mean((2, 3)))


def test_in_place_ops_give_the_out_of_place_result():
    m_in = randomize(InPlace(), 3)
    m_out = randomize(OutOfPlace(), 3)
    x = torch.randn(3, 2, 5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 1])
    a, b = run(m_in, x, y, per_sample=True), run(m_out, x, y, per_sample=True)
    assert a.layer_names == b.layer_names
    np.testing.assert_allclose(a.weight, b.weight, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(a.edge_attr("abs_weight"), b.edge_attr("abs_weight"), rtol=1e-12, atol=1e-15)
    for k in a.node_attrs:
        np.testing.assert_allclose(a.node_attr(k), b.node_attr(k), rtol=1e-12, atol=1e-15, err_msg=k)
    assert_conserved(a)
    assert_complete(a)


def test_model_left_as_found():
    m = randomize(InPlace(), 4)
    m.train()
    m.c1.eval()
    m.c2.weight.requires_grad_(False)
    training = {n: s.training for n, s in m.named_modules()}
    flags = {n: p.requires_grad for n, p in m.named_parameters()}
    state = copy.deepcopy(m.state_dict())
    x = torch.randn(2, 2, 5, 5, dtype=torch.float64)
    with pytest.warns(UserWarning, match="training mode"):
        g = run(m, x, torch.tensor([0, 1]), per_sample=True)
    assert_conserved(g)  # ran in eval mode: dropout off, BN folded with running statistics
    assert {n: s.training for n, s in m.named_modules()} == training
    assert {n: p.requires_grad for n, p in m.named_parameters()} == flags
    for k, v in m.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert all(p.grad is None for p in m.parameters())
    assert m.act.inplace is True
    for s in m.modules():
        assert not s._forward_hooks and not s._forward_pre_hooks and not s._backward_hooks
    assert x.grad is None and not x.requires_grad
    assert next(m.parameters()).device.type == "cpu"


def test_model_left_as_found_when_a_batch_fails():
    m = randomize(InPlace(), 4).train()
    x = torch.randn(2, 2, 5, 5, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(DataError, match="out of range"):
            run(m, x, torch.tensor([0, 5]))
    assert all(s.training for s in m.modules())
    assert m.act.inplace is True


# ---------------------------------------------------------------------- gaps a mutation audit found (issue 16)
def randomize_bn_signs(model: nn.Module, seed: int) -> nn.Module:
    """``randomize``, then gamma of both signs in every BatchNorm (alternating by channel).

    torchvision's ``weights=None`` BatchNorms have mean 0, var 1, gamma 1, beta 0: every
    folded shift is 0, so a mishandled shift cannot show on them.
    """
    model = randomize(model, seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                sign = torch.ones_like(m.weight)
                sign[1::2] = -1.0
                m.weight.copy_(m.weight.abs() * sign)
    return model


class PreActBlock(nn.Module):
    """Pre-activation residual block (He et al. 2016): bn1 reads the block input, which the skip reads too."""

    def __init__(self, c: int):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(c), nn.Conv2d(c, c, 3, padding=1)
        self.bn2, self.conv2 = nn.BatchNorm2d(c), nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        h = self.conv1(F.relu(self.bn1(x)))
        h = self.conv2(F.relu(self.bn2(h)))
        return h + x


class PreActNet(nn.Module):
    def __init__(self, c: int = 4, classes: int = 3):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.blocks = nn.Sequential(PreActBlock(c), PreActBlock(c))
        self.bn = nn.BatchNorm2d(c)
        self.fc = nn.Linear(c, classes)

    def forward(self, x):
        return self.fc(F.relu(self.bn(self.blocks(self.stem(x)))).mean((2, 3)))


def _tiny_densenet():
    return torchvision.models.DenseNet(growth_rate=4, block_config=(2, 2), num_init_features=8, bn_size=2,
                                       num_classes=5)


@pytest.mark.parametrize("build, shift_layers", [
    # bn1 of each block sits after a branch point: its shift is a constant term of the unit it reads
    pytest.param(PreActNet, ["stem", "blocks.0.add"], id="preact"),
    # norm1 after each concat, norm0 after conv0, transition norm and norm5 after a concat
    pytest.param(_tiny_densenet, ["features.denseblock1.denselayer2.cat", "features.denseblock2.cat"],
                 id="densenet"),
])
def test_batchnorm_shifts_conserve_flow(build, shift_layers):
    model = randomize_bn_signs(build(), 11)
    gen = torch.Generator().manual_seed(12)
    x = torch.randn(2, 3, 16, 16, generator=gen, dtype=torch.float64)
    y = torch.tensor([1, 2])
    g = run(model, x, y)
    with torch.no_grad():
        T = model(x).gather(1, y[:, None]).sum().item()
    assert g.meta["target_total"] == pytest.approx(T, rel=1e-9)
    assert_conserved(g, rtol=1e-9)
    assert_complete(g, rtol=1e-9)
    assert g.meta["completeness_relative"] < 1e-9
    # The shifts are really there (else the test would prove nothing about them).
    B = g.node_attr("bias_attribution")
    for name in shift_layers:
        assert np.abs(g.node_attr("bias_attribution", name)).max() > 1e-3 * np.abs(B).max(), name


def test_frequency_does_not_count_a_dead_unit():
    # unit 0: weight 0, bias -1, so ReLU gives exactly 0 everywhere (mean exactly 0); unit 1: always 1
    model = nn.Sequential(nn.Conv2d(2, 3, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 2))
    model = randomize(model, 4)
    with torch.no_grad():
        model[0].weight[:2] = 0.0
        model[0].bias[:2] = torch.tensor([-1.0, 1.0], dtype=torch.float64)
    x = torch.randn(5, 2, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    g = run(model, x, target=0)
    a = F.relu(model[0](x)).mean((2, 3)).detach().numpy()
    assert a[:, 0].max() == 0.0 and g.node_attr("activation_mean", "0")[0] == 0.0
    freq = g.node_attr("frequency", "0")
    assert freq[0] == 0.0 and freq[1] == 1.0
    np.testing.assert_array_equal(freq, (a > 0).mean(0))


class Padded(nn.Module):
    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.conv = conv
        self.fc = nn.Linear(conv.out_channels, 3)

    def forward(self, x):
        return self.fc(F.relu(self.conv(x)).mean((2, 3)))


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")  # torch's own note on a copy
@pytest.mark.parametrize("conv", [
    # height and width padded differently: F.pad takes (left, right, top, bottom)
    pytest.param(lambda: nn.Conv2d(2, 3, 3, padding=(1, 2), padding_mode="reflect"), id="reflect-1x2"),
    # an even kernel: "same" pads one more at the right and bottom than at the left and top
    pytest.param(lambda: nn.Conv2d(2, 3, 4, padding="same"), id="same-even"),
    pytest.param(lambda: nn.Conv2d(2, 3, (2, 4), padding="same", padding_mode="reflect"), id="same-even-reflect"),
])
def test_per_sample_abs_weight_with_uneven_padding(conv):
    model = randomize(Padded(conv()), 6)
    gen = torch.Generator().manual_seed(7)
    # a square image: swapped paddings give the same number of positions, so only values can tell
    x = torch.randn(3, 2, 6, 6, generator=gen, dtype=torch.float64)
    y = torch.tensor([0, 2, 1])
    g = run(model, x, y, per_sample=True)
    # brute force: one attribution per image (W * dW, no padding of our own), |flow| summed
    singles = [run(model, x[k : k + 1], y[k : k + 1]) for k in range(3)]
    for s in singles:
        assert np.array_equal(s.src, g.src) and np.array_equal(s.dst, g.dst)
    expect = sum(np.abs(s.weight) for s in singles)
    atol = 1e-10 * flow_scale(g)
    np.testing.assert_allclose(g.edge_attr("abs_weight"), expect, rtol=1e-9, atol=atol)
