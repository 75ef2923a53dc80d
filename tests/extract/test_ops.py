"""The op registry (connectome.extract.ops): every entry declares its facts, every registered op
runs through tracing, flows and receptive fields together, and users register their own ops.

Each registered op is run on a tiny model ``conv -> op -> 1x1 conv -> linear`` (its entry's
examples): the graph must be exact (completeness, ``target_total`` equal to the model's own
logits, the weight graph with the same edges), the traced graph must hold the op, every crop
must hold the gradient support of its unit, and an op whose receptive behaviour is not global
must give a crop in at least one example (the drift that lost crops).
"""

from __future__ import annotations

import operator

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import connectome as cn
from connectome.errors import ExtractionError
from connectome.extract import ops
from connectome.extract.ops import CONSTRUCT, LAYOUT, NONE, Receptive
from connectome.extract.receptive import receptive_fields
from connectome.extract.rules import RULES
from connectome.extract.trace import _CONSTRUCTS, run_nodes, trace_units

_GEOMETRY = {Receptive.WINDOW: {"kernel_size", "stride", "padding", "dilation"}, Receptive.PAD: {"pad"},
             Receptive.STATS: {"dims"}, Receptive.PERMUTE: {"dims"}, Receptive.TRANSPOSE: {"dims"},
             Receptive.CONCAT: {"dim"}}


class Tiny(nn.Module):
    """conv 3 -> 4 (8x8, padding 1), the op, a 1x1 conv to 2 channels, a Linear to 3 logits."""

    def __init__(self, made: nn.Module | object) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.c1 = nn.Conv2d(3, 4, 3, padding=1)
        if isinstance(made, nn.Module):
            self.op = made
        else:
            self.f = made
        with torch.no_grad():
            self.c1.weight.copy_(torch.randn(self.c1.weight.shape, generator=g) * 0.5)
            h = self.body(torch.zeros(1, 3, 8, 8))
        self.c2 = nn.Conv2d(h.shape[1], 2, 1)
        self.fc = nn.Linear(2 * h.shape[2] * h.shape[3], 3)

    def body(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c1(x)
        return self.op(h) if "op" in self._modules else self.f(h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.c2(self.body(x)).flatten(1))


def _support_inside(model: nn.Module, x: torch.Tensor, ug, crop: list[int]) -> None:
    """Each sampled position's gradient support in the input lies inside its crop."""
    node = ug.layers[ug.layer_index("c2")].out_node
    jy, sy, ny, jx, sx, nx, h, w = crop
    xg = x.clone().requires_grad_(True)
    with torch.enable_grad():
        _, kept = run_nodes(ug.gm, (xg,), keep={node})
        v = kept[node]
        assert (v.shape[2], v.shape[3]) == (h, w)
        for pos in range(0, h * w, max(1, h * w // 9)):
            r, c = divmod(pos, w)
            (gx,) = torch.autograd.grad(v[:, 0, r, c].sum(), xg, retain_graph=True)
            rows, cols = np.nonzero((gx.abs().sum((0, 1)) > 0).numpy())
            if rows.size:
                assert rows.min() >= sy + r * jy and rows.max() < sy + r * jy + ny, (pos, crop)
                assert cols.min() >= sx + c * jx and cols.max() < sx + c * jx + nx, (pos, crop)


def test_every_entry_declares_its_facts():
    names = set()
    for op in ops.entries():
        assert op.name and op.name not in names, op.name
        names.add(op.name)
        assert op.modules or op.functions or op.function_names or op.methods, f"{op.name}: no matcher"
        assert op.rule in RULES or op.rule in (NONE, LAYOUT, CONSTRUCT), f"{op.name}: rule {op.rule!r}"
        assert isinstance(op.receptive, Receptive), f"{op.name}: no receptive-field behaviour"
        if op.rule == CONSTRUCT:
            assert op.construct in _CONSTRUCTS, f"{op.name}: construct {op.construct!r} is not one of tracing's"
        if op.rule in RULES:  # a rule reads its parameters off the call
            assert op.params is not None, f"{op.name}: rule {op.rule!r} without params"
        if op.receptive in _GEOMETRY:
            assert op.geometry is not None, f"{op.name}: {op.receptive} without geometry"
        assert op.family.startswith("connectome.extract.ops."), f"{op.name}: family {op.family!r}"
        assert op.examples, f"{op.name}: no example (the registry test runs every entry through its examples)"
        for f in op.functions:
            pos = op.inplace_arg
            assert pos is None or isinstance(pos, int) and pos > 0
        for a, b in op.inplace_variants:
            assert a is not b and b in op.functions, f"{op.name}: in-place {a} without its out-of-place form"
        assert op.pooled in (0, 1, 2)


def test_geometry_names_what_receptive_fields_read():
    # geometry of an example call of each entry holds the keys its behaviour reads
    model_ops = {}
    for op in ops.entries():
        if op.geometry is None:
            continue
        for factory in op.examples:
            try:
                m = Tiny(factory()).double().eval()
            except ImportError:
                continue
            ug = trace_units(m, torch.zeros(1, 3, 8, 8, dtype=torch.float64))
            modules = dict(ug.gm.named_modules())
            for n in ug.gm.graph.nodes:
                if ops.op_for_node(n, modules) is op and n.op in ("call_module", "call_function", "call_method"):
                    call = ops.Call(n, modules[n.target] if n.op == "call_module" else None)
                    model_ops[op.name] = set(op.geometry(call))
                    assert _GEOMETRY.get(op.receptive, set()) <= model_ops[op.name], op.name
    assert model_ops  # some entries were checked


@pytest.mark.parametrize("op", ops.entries(), ids=lambda op: op.name)
def test_every_registered_op_traces_flows_and_crops(op, exact_graph):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 2])
    crops = 0
    for factory in op.examples:
        try:
            made = factory()
        except ImportError:  # an optional package (torchvision's StochasticDepth)
            continue
        model = Tiny(made).double().eval()
        exact_graph(model, x, y)
        ug = trace_units(model, x[:1])
        modules = dict(ug.gm.named_modules())
        assert any(ops.op_for_node(n, modules) is op for n in ug.gm.graph.nodes
                   if n.op in ("call_module", "call_function", "call_method")), f"{op.name}: example not traced to it"
        fields, size = receptive_fields(ug)
        assert size == [8, 8]
        crop = fields["c2"]
        if crop is not None:
            crops += 1
            _support_inside(model, x, ug, crop)
    if op.receptive != Receptive.GLOBAL and op.examples:
        assert crops, f"{op.name}: declared {op.receptive}, but no example kept its receptive field"


# ----------------------------------------------------------------------------- the drift regression
@pytest.mark.parametrize("made", [nn.Softsign(), nn.LogSigmoid(), F.softplus, torch.erf, lambda x: x.sigmoid_(),
                                  lambda x: x.clip_(-0.5, 0.5), nn.Tanhshrink()],
                         ids=["Softsign", "LogSigmoid", "F.softplus", "torch.erf", "sigmoid_", "clip_", "Tanhshrink"])
def test_receptive_fields_follow_every_op_tracing_accepts(made):
    # these traced, but receptive fields did not know them: their models lost every crop
    x = torch.zeros(1, 3, 8, 8, dtype=torch.float64)
    fields, _ = receptive_fields(trace_units(Tiny(made).double().eval(), x))
    reference, _ = receptive_fields(trace_units(Tiny(nn.ReLU()).double().eval(), x))
    assert reference["c2"] is not None
    assert fields["c2"] == reference["c2"]


# ----------------------------------------------------------------------------- new ops against hand computations
def _hand_input_attribution(forward, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    x = x.clone().requires_grad_(True)
    T = forward(x).gather(1, y[:, None]).sum()
    (g,) = torch.autograd.grad(T, x)
    return (x * g).sum((0, 2, 3)).detach().numpy()


def _identity_rule(f, z: torch.Tensor) -> torch.Tensor:
    """f(z) = f(0) + z * r, r = (f(z) - f(0)) / z held constant (0 where z is 0)."""
    f0 = f(torch.zeros(1, dtype=z.dtype))
    r = torch.where(z == 0, torch.zeros_like(z), (f(z) - f0) / z)
    return f0 + z * r.detach()


_HAND = {  # the op as the rule linearises it, on (N, 4, 8, 8)
    "rms_norm": (lambda: nn.RMSNorm(8, eps=1e-3),
                 lambda m, z: z * torch.rsqrt(z.pow(2).mean(-1, keepdim=True) + 1e-3).detach() * m.weight),
    "F.rms_norm": (lambda: lambda z: F.rms_norm(z.permute(0, 2, 3, 1), (4,)).permute(0, 3, 1, 2),
                   lambda m, z: z * torch.rsqrt(z.pow(2).mean(1, keepdim=True)
                                                + torch.finfo(z.dtype).eps).detach()),
    "normalize": (lambda: lambda z: F.normalize(z, dim=1),
                  lambda m, z: z / z.detach().norm(2, 1, keepdim=True).clamp_min(1e-12)),
    "neg": (lambda: lambda z: -z, lambda m, z: -z),
    "pow": (lambda: lambda z: z ** 2, lambda m, z: _identity_rule(lambda t: t ** 2, z)),
    "pow3": (lambda: lambda z: torch.pow(z, 3), lambda m, z: _identity_rule(lambda t: t ** 3, z)),
    "erf": (lambda: torch.erf, lambda m, z: _identity_rule(torch.erf, z)),
}


@pytest.mark.parametrize("name", list(_HAND))
def test_new_ops_match_their_rule_by_hand(name, exact_graph):
    make, hand_op = _HAND[name]
    model = Tiny(make()).double().eval()
    if "op" in model._modules:
        with torch.no_grad():
            model.op.weight.copy_(torch.linspace(0.5, 1.5, 8, dtype=torch.float64))
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    y = torch.tensor([0, 1, 2])
    m = model._modules.get("op")

    def hand(z: torch.Tensor) -> torch.Tensor:
        return model.fc(model.c2(hand_op(m, model.c1(z))).flatten(1))

    expect = _hand_input_attribution(hand, x, y)  # before exact_graph rounds the weights to float32 and back
    g = exact_graph(model, x, y, conservation=True)
    got = g.node_attr("attribution")[g.layer_slice("input")]
    np.testing.assert_allclose(got, expect, rtol=1e-10, atol=1e-10 * max(1.0, np.abs(expect).max()))


def test_pow_with_a_data_exponent_is_refused():
    with pytest.raises(ExtractionError, match="exponent is not a number"):
        trace_units(Tiny(lambda z: z ** z.sigmoid()).double(), torch.zeros(1, 3, 8, 8, dtype=torch.float64))


# ----------------------------------------------------------------------------- users' ops
class Swish(nn.Module):
    """A users' activation with a parameter: x * sigmoid(beta * x)."""

    def __init__(self) -> None:
        super().__init__()
        self.beta = nn.Parameter(torch.tensor(1.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.beta * x)


class SwishImplementation(torch.autograd.Function):
    """EfficientNet-PyTorch's memory-efficient Swish (efficientnet_pytorch/utils.py)."""

    @staticmethod
    def forward(ctx, i):
        result = i * torch.sigmoid(i)
        ctx.save_for_backward(i)
        return result

    @staticmethod
    def backward(ctx, grad_output):
        i = ctx.saved_tensors[0]
        sigmoid_i = torch.sigmoid(i)
        return grad_output * (sigmoid_i * (1 + i * (1 - sigmoid_i)))


class MemoryEfficientSwish(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return SwishImplementation.apply(x)


@pytest.fixture
def registered():
    names = []

    def register(target, **kw):
        op = cn.extract.register_op(target, **kw)
        names.append(op.name)
        return op

    yield register
    for n in names:
        cn.extract.unregister_op(n)


@pytest.mark.parametrize("target,make", [(Swish, Swish), (SwishImplementation, MemoryEfficientSwish),
                                         (SwishImplementation.apply, MemoryEfficientSwish)],
                         ids=["module", "autograd.Function", "Function.apply"])
def test_register_op_makes_a_users_op_one_smooth_op(target, make, registered, exact_graph):
    op = registered(target, rule="smooth")
    model = Tiny(make()).double().eval()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    y = torch.tensor([1, 2])
    ug = trace_units(model, x[:1])
    modules = dict(ug.gm.named_modules())
    mine = [n for n in ug.gm.graph.nodes if n.op in ("call_module", "call_function")
            and ops.op_for_node(n, modules) is op]
    assert len(mine) == 1  # one call, not traced into (no sigmoid or product of its own)
    assert not any(n.target in (torch.sigmoid, operator.mul) for n in ug.gm.graph.nodes)
    g = exact_graph(model, x, y, conservation=True)
    assert any("identity rule" in r for r in g.meta["rules"])
    f = model._modules["op"]

    def hand(z: torch.Tensor) -> torch.Tensor:
        return model.fc(model.c2(_identity_rule(f, model.c1(z))).flatten(1))

    expect = _hand_input_attribution(hand, x, y)
    got = g.node_attr("attribution")[g.layer_slice("input")]
    np.testing.assert_allclose(got, expect, rtol=1e-10, atol=1e-10 * max(1.0, np.abs(expect).max()))
    fields, _ = receptive_fields(ug)
    assert fields["c2"] is not None  # pointwise by default


class Scale(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.tensor([0.5, -1.0, 2.0, 1.5])[:, None, None])
        self.b = nn.Parameter(torch.tensor([0.1, 0.2, -0.3, 0.0])[:, None, None])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.a + self.b


class Gate(nn.Module):
    def forward(self, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return x * s


class Gated(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gate = Gate()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gate(x, x.mean((2, 3), keepdim=True).sigmoid())


def test_register_op_affine_and_gate(registered, exact_graph):
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    y = torch.tensor([0, 1])
    registered(Scale, rule="affine")
    model = Tiny(Scale()).double().eval()
    g = exact_graph(model, x, y, conservation=True)
    w = cn.extract.weights(model, (3, 8, 8))
    # the scale is folded into the weight graph: edges into c1's units times a
    wl = w.layer_slice("c1")
    assert w.meta["method"] == "weights" and wl.stop - wl.start == 4
    assert g.meta["rules"] == []  # affine: nothing held constant
    registered(Gate, rule="gate")
    model = Tiny(Gated()).double().eval()
    g = exact_graph(model, x, y, conservation=True)
    assert any(r.startswith("gate") for r in g.meta["rules"])

    def hand(z: torch.Tensor) -> torch.Tensor:
        h = model.c1(z)
        return model.fc(model.c2(h * h.mean((2, 3), keepdim=True).sigmoid().detach()).flatten(1))

    expect = _hand_input_attribution(hand, x, y)
    got = g.node_attr("attribution")[g.layer_slice("input")]
    np.testing.assert_allclose(got, expect, rtol=1e-10, atol=1e-10 * max(1.0, np.abs(expect).max()))


def test_register_op_norm_reads_the_modules_attributes(registered, exact_graph):
    class MyRMSNorm(nn.Module):  # LLaMA's RMSNorm, written out
        def __init__(self, dim: int, eps: float = 1e-5) -> None:
            super().__init__()
            self.eps, self.weight = eps, nn.Parameter(torch.linspace(0.5, 1.5, dim))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight

    registered(MyRMSNorm, rule="norm", norm="rms")
    model = Tiny(MyRMSNorm(8)).double().eval()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    y = torch.tensor([2, 0])
    g = exact_graph(model, x, y, conservation=True)
    m = model.op

    def hand(z: torch.Tensor) -> torch.Tensor:
        h = model.c1(z)
        return model.fc(model.c2(h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5).detach() * m.weight)
                        .flatten(1))

    expect = _hand_input_attribution(hand, x, y)
    got = g.node_attr("attribution")[g.layer_slice("input")]
    np.testing.assert_allclose(got, expect, rtol=1e-10, atol=1e-10 * max(1.0, np.abs(expect).max()))


def test_register_op_refuses_bad_registrations(registered):
    with pytest.raises(ExtractionError, match="nn.Module subclass or a torch.autograd.Function"):
        cn.extract.register_op(lambda x: x, rule="smooth")
    with pytest.raises(ExtractionError, match="the rule must be one of"):
        cn.extract.register_op(Swish, rule="exp")
    with pytest.raises(ExtractionError, match="registered already as op 'relu'"):
        cn.extract.register_op(nn.ReLU, rule="none")
    registered(Swish, rule="smooth")
    with pytest.raises(ExtractionError, match="registered already"):
        cn.extract.register_op(Swish, rule="none")
    with pytest.raises(ExtractionError, match="no op named"):
        cn.extract.unregister_op("no such op")


def test_affine_registration_of_a_non_affine_module_is_refused(registered):
    registered(Swish, rule="affine")
    with pytest.raises(ExtractionError, match="registered as affine but is not"):
        trace_units(Tiny(Swish()).double(), torch.zeros(1, 3, 8, 8, dtype=torch.float64))
