"""The weight connectome: unit layers of real architectures, exact edge weights on tiny models, errors."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import connectome as cn
from connectome.errors import ConnectomeError, ExtractionError
from connectome.extract import weights
from connectome.graph import Connectome

torchvision = pytest.importorskip("torchvision")


def edges_of(g: Connectome, src: str, dst: str) -> np.ndarray:
    """The block ``src -> dst`` as a dense (dst units, src units) matrix, NaN where no edge."""
    i, j, w = g.edge_block(src, dst)
    out = np.full((g.layer(dst).size, g.layer(src).size), np.nan)
    out[j, i] = w
    return out


def seeded(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights and BatchNorm statistics, so that nothing is 0 or 1 by accident."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype))
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen))
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
    return model.eval()


# ---------------------------------------------------------------------- real architectures
def _googlenet():
    return torchvision.models.googlenet(weights=None, init_weights=False)  # aux_logits stays at its default


ARCHS = [
    pytest.param("resnet18", lambda: torchvision.models.resnet18(weights=None), (3, 32, 32), id="resnet18"),
    pytest.param("resnet50", lambda: torchvision.models.resnet50(weights=None), (3, 32, 32), id="resnet50",
                 marks=pytest.mark.slow),
    pytest.param("vgg11", lambda: torchvision.models.vgg11(weights=None), (3, 32, 32), id="vgg11", marks=pytest.mark.slow),
    pytest.param("alexnet", lambda: torchvision.models.alexnet(weights=None), (3, 64, 64), id="alexnet",
                 marks=pytest.mark.slow),
    pytest.param("googlenet", _googlenet, (3, 32, 32), id="googlenet", marks=pytest.mark.slow),
    pytest.param("mobilenet_v2", lambda: torchvision.models.mobilenet_v2(weights=None), (3, 32, 32), id="mobilenet_v2",
                 marks=pytest.mark.slow),
    pytest.param("densenet121", lambda: torchvision.models.densenet121(weights=None), (3, 32, 32), id="densenet121",
                 marks=pytest.mark.slow),
    pytest.param("squeezenet1_0", lambda: torchvision.models.squeezenet1_0(weights=None), (3, 32, 32), id="squeezenet1_0"),
    pytest.param("mlp", lambda: nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 16), nn.ReLU(), nn.Linear(16, 12),
                                              nn.ReLU(), nn.Linear(12, 1000)), (3, 8, 8), id="mlp"),
    pytest.param("cnn", lambda: nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                                              nn.Conv2d(8, 6, 3, groups=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                              nn.Flatten(), nn.Linear(6, 1000)), (3, 16, 16), id="cnn"),
]


@pytest.mark.parametrize("arch, build, shape", ARCHS)
def test_unit_layers_match_modules(arch, build, shape):
    model = build()
    g = weights(model, shape)
    assert g.meta["method"] == "weights" and g.meta["input_shape"] == list(shape)
    assert g.weight.dtype == np.float32 and np.isfinite(g.weight).all()
    assert g.layers[0].name == "input" and g.layers[0].kind == "input" and g.layers[0].size == shape[0]
    out = g.layers[-1]
    assert out.name == "logits" and out.kind == "output" and out.size == 1000
    by_module = {l.module: l for l in g.layers if l.kind in ("conv", "linear", "output")}
    modules = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)}
    if arch == "googlenet":  # the auxiliary heads only run in training mode
        modules = {n: m for n, m in modules.items() if not n.startswith(("aux1.", "aux2."))}
    assert set(by_module) == set(modules)
    for path, m in modules.items():
        layer = by_module[path]
        assert layer.size == (m.out_channels if isinstance(m, nn.Conv2d) else m.out_features), path
        assert layer.name == ("logits" if layer is out else path)
        assert layer.kind == ("output" if layer is out else ("conv" if isinstance(m, nn.Conv2d) else "linear"))
    # Edge counts: a (grouped) conv or linear connects each output to in/groups inputs, once.
    for l in g.layers[1:]:
        if l.module not in modules:
            continue
        m = modules[l.module]
        sl = g.layer_slice(l.name)
        indeg = np.bincount(g.dst[(g.dst >= sl.start) & (g.dst < sl.stop)] - sl.start, minlength=l.size)
        fan = m.in_channels // m.groups if isinstance(m, nn.Conv2d) else None
        if fan is not None:
            assert np.all(indeg == fan), l.name
    # Every residual/concat unit has identity inputs; nothing is left unconnected.
    outdeg = np.bincount(g.src, minlength=g.num_nodes)
    assert np.all(outdeg[: g.layer_slice("logits").start] > 0)
    assert np.all(np.bincount(g.dst, minlength=g.num_nodes)[g.layers[0].size :] > 0)


def test_resnet18_skip_connections_are_identity_edges():
    g = weights(torchvision.models.resnet18(weights=None), (3, 32, 32))
    kinds = [l.kind for l in g.layers]
    assert kinds.count("residual") == 8
    add = g.layer("layer1.0.add")
    assert add.kind == "residual" and add.size == 64
    # The add reads the block's bn2 output (folded into conv2) and the block input (maxpool of conv1).
    e = edges_of(g, "conv1", "layer1.0.add")
    assert np.array_equal(np.isnan(e), ~np.eye(64, dtype=bool))
    # Identity edges are exactly 1: bn2 is folded into conv2's incoming edges, not into the skip.
    np.testing.assert_array_equal(np.diag(edges_of(g, "layer1.0.conv2", "layer1.0.add")), 1.0)
    # A downsampling block's shortcut is a conv layer of its own.
    assert g.layer("layer2.0.downsample.0").kind == "conv"
    assert ("layer2.0.downsample.0", "layer2.0.add") in g.layer_pairs()


# ---------------------------------------------------------------------- exact weights on tiny models
class Depthwise(nn.Module):
    def __init__(self):
        super().__init__()
        self.dw = nn.Conv2d(3, 3, 3, groups=3, padding=1)
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        return self.fc(F.relu(self.dw(x)).mean((2, 3)))


def test_depthwise_conv():
    m = seeded(Depthwise())
    g = weights(m, (3, 5, 5))
    e = edges_of(g, "input", "dw")
    W = m.dw.weight.detach().double()
    np.testing.assert_allclose(np.diag(e), W.sum((1, 2, 3)).numpy(), rtol=1e-5, atol=1e-5)
    assert np.isnan(e[~np.eye(3, dtype=bool)]).all()
    np.testing.assert_allclose(edges_of(g, "dw", "logits"), m.fc.weight.detach().numpy(), rtol=1e-6)


def test_grouped_conv():
    m = seeded(nn.Sequential(nn.Conv2d(4, 6, 3, groups=2), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 2 * 2, 3)))
    g = weights(m, (4, 4, 4))
    e = edges_of(g, "input", "0")
    W = m[0].weight.detach().double()
    for j in range(6):
        for i in range(4):
            if i // 2 == j // 3:
                # float32 kernel sums: absolute tolerance on the scale of the weights
                assert e[j, i] == pytest.approx(float(W[j, i % 2].sum()), abs=1e-5)
            else:
                assert np.isnan(e[j, i])


class Residual(nn.Module):
    def __init__(self, bn_after_add=False, sub=False):
        super().__init__()
        self.c1 = nn.Conv2d(2, 3, 3, padding=1)
        self.c2 = nn.Conv2d(3, 3, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(3) if bn_after_add else nn.Identity()
        self.fc = nn.Linear(3, 2)
        self.sub = sub

    def forward(self, x):
        a = F.relu(self.c1(x))
        b = self.c2(a)
        y = a - b if self.sub else b + a
        return self.fc(F.relu(self.bn(y)).mean((2, 3)))


def test_residual_add_is_identity_edges():
    m = seeded(Residual())
    g = weights(m, (2, 4, 4))
    assert g.layer("add").kind == "residual"
    for src in ("c1", "c2"):
        e = edges_of(g, src, "add")
        np.testing.assert_array_equal(np.diag(e), 1.0)
        assert np.isnan(e[~np.eye(3, dtype=bool)]).all()
    # c1 feeds both c2 and the add.
    assert {("c1", "c2"), ("c1", "add"), ("c2", "add"), ("add", "logits")} <= set(g.layer_pairs())


def test_residual_sub_has_negative_identity_edges():
    g = weights(seeded(Residual(sub=True)), (2, 4, 4))
    np.testing.assert_array_equal(np.diag(edges_of(g, "c1", "sub")), 1.0)
    np.testing.assert_array_equal(np.diag(edges_of(g, "c2", "sub")), -1.0)


def test_batchnorm_after_add_scales_identity_edges():
    m = seeded(Residual(bn_after_add=True))
    g = weights(m, (2, 4, 4))
    bn = m.bn
    scale = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach().double().numpy()
    for src in ("c1", "c2"):
        np.testing.assert_allclose(np.diag(edges_of(g, src, "add")), scale, rtol=1e-6)


class Concat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(2, 2, 1)
        self.b = nn.Conv2d(2, 3, 3, padding=1)
        self.fc = nn.Linear(5, 2)

    def forward(self, x):
        y = torch.cat([F.relu(self.a(x)), F.relu(self.b(x))], dim=1)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(y, 1), 1))


def test_concat_is_identity_edges_with_offsets():
    g = weights(seeded(Concat()), (2, 4, 4))
    cat = g.layer("cat")
    assert cat.kind == "concat" and cat.size == 5
    ea, eb = edges_of(g, "a", "cat"), edges_of(g, "b", "cat")
    assert ea.shape == (5, 2) and eb.shape == (5, 3)
    eye = lambda k: np.where(np.eye(k, dtype=bool), 1.0, np.nan)  # noqa: E731  (NaN: no edge)
    np.testing.assert_array_equal(ea[:2], eye(2))
    assert np.isnan(ea[2:]).all()
    np.testing.assert_array_equal(eb[2:], eye(3))
    assert np.isnan(eb[:2]).all()


@pytest.mark.parametrize("reduce", ["sum", "l1", "l2"])
def test_batchnorm_folding_and_reduce(reduce):
    m = seeded(nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                             nn.Flatten(), nn.Linear(3, 2)), seed=3)
    with torch.no_grad():
        m[1].weight[0] = -abs(m[1].weight[0])  # a negative gamma: l1/l2 take |scale|
    g = weights(m, (2, 5, 5), reduce=reduce)
    assert g.meta["reduce"] == reduce
    W = m[0].weight.detach().double()
    bn = m[1]
    scale = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach().double()
    kernel = {"sum": W.sum((2, 3)), "l1": W.abs().sum((2, 3)), "l2": W.pow(2).sum((2, 3)).sqrt()}[reduce]
    s = scale if reduce == "sum" else scale.abs()
    np.testing.assert_allclose(edges_of(g, "input", "0"), (kernel * s[:, None]).numpy(), rtol=1e-5, atol=1e-5)
    fc = m[5].weight.detach().double()
    expect = {"sum": fc, "l1": fc.abs(), "l2": fc.abs()}[reduce]
    np.testing.assert_allclose(edges_of(g, "0", "logits"), expect.numpy(), rtol=1e-6)


@pytest.mark.parametrize("pool", [None, 2])
def test_flatten_into_linear_sums_over_positions(pool):
    layers = [nn.Conv2d(2, 3, 3), nn.ReLU()]
    if pool:
        layers.append(nn.AdaptiveAvgPool2d(pool))
    positions = (pool or 4) ** 2
    m = seeded(nn.Sequential(*layers, nn.Flatten(), nn.Linear(3 * positions, 4)))
    g = weights(m, (2, 6, 6))
    W = m[-1].weight.detach().double().reshape(4, 3, positions)
    np.testing.assert_allclose(edges_of(g, "0", "logits"), W.sum(-1).numpy(), rtol=1e-5, atol=1e-5)
    l1 = weights(m, (2, 6, 6), reduce="l1")
    np.testing.assert_allclose(edges_of(l1, "0", "logits"), W.abs().sum(-1).numpy(), rtol=1e-6)
    l2 = weights(m, (2, 6, 6), reduce="l2")
    np.testing.assert_allclose(edges_of(l2, "0", "logits"), W.pow(2).sum(-1).sqrt().numpy(), rtol=1e-6)


def test_mlp_on_flat_input():
    m = seeded(nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)))
    g = weights(m, (4,), labels=["a", "b"])
    assert [l.size for l in g.layers] == [4, 3, 2]
    assert g.layer("logits").labels == ("a", "b")
    np.testing.assert_allclose(edges_of(g, "input", "0"), m[0].weight.detach().numpy(), rtol=1e-7)
    with pytest.raises(ValueError, match="3 class names"):
        weights(m, (4,), labels=["a", "b", "c"])


class SameConv(nn.Conv2d):
    """TensorFlow-style 'same' padding: pad (asymmetrically for even kernels), then a plain conv."""

    def forward(self, x):
        kh, kw = self.kernel_size
        ph, pw = kh - 1, kw - 1
        x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class TFNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = SameConv(2, 3, 4)
        self.bn = nn.BatchNorm2d(3)
        self.head = nn.Linear(3, 2)

    def forward(self, x):
        return self.head(F.relu(self.bn(self.stem(x))).mean((2, 3)))


def test_conv_subclass_with_own_forward_is_a_layer():
    m = seeded(TFNet())
    g = weights(m, (2, 5, 5))
    assert g.layer_names == ["input", "stem", "logits"]
    assert g.layer("stem").kind == "conv" and g.layer("stem").size == 3
    scale = (m.bn.weight / torch.sqrt(m.bn.running_var + m.bn.eps)).detach().double()
    expect = m.stem.weight.detach().double().sum((2, 3)) * scale[:, None]
    np.testing.assert_allclose(edges_of(g, "input", "stem"), expect.numpy(), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------- errors
def one_line(exc: BaseException) -> str:
    msg = str(exc)
    assert "\n" not in msg and len(msg) < 600
    return msg


@pytest.mark.parametrize("thing", [None, "resnet18", lambda x: x, torch.zeros(3)])
def test_not_a_module(thing):
    with pytest.raises(ExtractionError, match="expected a torch.nn.Module") as info:
        weights(thing, (3, 8, 8))
    one_line(info.value)


@pytest.mark.parametrize("shape, module", [((1, 8, 8), "'0'"), ((3, 9, 9), "'3'")])
def test_input_shape_the_model_rejects(shape, module):
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    with pytest.raises(ExtractionError, match=f"module {module}.*input_shape") as info:
        weights(m, shape)
    one_line(info.value)


@pytest.mark.parametrize("shape", [(3, 0, 8), (), "abc", (3, -1)])
def test_bad_input_shape_value(shape):
    with pytest.raises(ValueError, match="input_shape"):
        weights(nn.Linear(3, 2), shape)


def test_bad_reduce():
    with pytest.raises(ValueError, match="reduce must be one of"):
        weights(nn.Linear(3, 2), (3,), reduce="max")


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        if x.sum() > 0:
            x = -x
        return self.fc(x)


def test_untraceable_model():
    with pytest.raises(ExtractionError, match="cannot trace DataDependent.*computed from the input's contents") as info:
        weights(DataDependent(), (3,))
    one_line(info.value)


def test_nan_weights():
    m = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 2 * 2, 2))
    with torch.no_grad():
        m[0].weight[1, 0, 0, 0] = float("nan")
    with pytest.raises(ExtractionError, match="layer '0' has NaN or inf weights") as info:
        weights(m, (2, 4, 4))
    one_line(info.value)


class Gate(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(2, 3, 1)
        self.b = nn.Conv2d(2, 3, 1)
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        return self.fc((self.a(x) * torch.sigmoid(self.b(x))).mean((2, 3)))


def test_product_of_two_tensors_has_identity_edges_of_weight_one():
    g = weights(Gate(), (2, 4, 4))
    assert g.layer("mul").kind == "product"
    for src in ("a", "b"):
        i, j, w = g.edge_block(src, "mul")
        assert i.tolist() == j.tolist() == [0, 1, 2] and np.all(w == 1.0)


@pytest.mark.parametrize(
    "model, shape, phrase",
    [
        (nn.Sequential(nn.ConvTranspose1d(2, 3, 1), nn.Flatten(), nn.Linear(12, 2)), (2, 4),
         "ConvTranspose1d layers are not supported"),
        (nn.Sequential(nn.Conv2d(2, 3, 1), nn.Softmax(dim=1), nn.Flatten(), nn.Linear(12, 2)), (2, 2, 2),
         "Softmax mixes units.*attention rule"),
        (nn.Sequential(nn.Conv2d(2, 3, 1)), (2, 2, 2), "expected \\(batch, classes\\)"),
    ],
)
def test_other_unsupported_models(model, shape, phrase):
    with pytest.raises(ExtractionError, match=phrase) as info:
        weights(model, shape)
    one_line(info.value)


# ---------------------------------------------------------------------- the caller's model
def test_model_left_as_found():
    m = seeded(Residual(bn_after_add=True))
    m.train()
    m.c1.eval()  # a mixed state must come back exactly
    m.c2.weight.requires_grad_(False)
    training = {n: s.training for n, s in m.named_modules()}
    flags = {n: p.requires_grad for n, p in m.named_parameters()}
    state = copy.deepcopy(m.state_dict())
    weights(m, (2, 4, 4))
    assert {n: s.training for n, s in m.named_modules()} == training
    assert {n: p.requires_grad for n, p in m.named_parameters()} == flags
    for k, v in m.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert all(p.grad is None for p in m.parameters())
    for s in m.modules():
        assert not s._forward_hooks and not s._forward_pre_hooks and not s._backward_hooks


class Quotient(Gate):
    def forward(self, x):
        return self.fc((self.a(x) / torch.sigmoid(self.b(x))).mean((2, 3)))  # no rule for 1/x


def test_model_left_as_found_when_extraction_fails():
    m = Quotient().train()
    with pytest.raises(ConnectomeError):
        weights(m, (2, 4, 4))
    assert all(s.training for s in m.modules())


def test_public_entry_points():
    assert cn.extract.weights is weights
    assert callable(cn.extract.attribution) and callable(cn.extract.attribution_by_category)
    with pytest.raises(AttributeError):
        cn.extract.nope  # noqa: B018


# ---------------------------------------------------------------------- known bugs
class OffChainBN(nn.Module):
    """BatchNorm on one branch of a tensor with several users (DenseNet's norm1, pre-activation ResNets)."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(2, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.c2 = nn.Conv2d(3, 3, 3, padding=1)
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        a = self.c1(x)
        b = self.c2(F.relu(self.bn(a)))
        return self.fc(F.relu(a + b).mean((2, 3)))


def test_batchnorm_on_a_branch_is_folded():
    m = seeded(OffChainBN())
    g = weights(m, (2, 4, 4))
    scale = (m.bn.weight / torch.sqrt(m.bn.running_var + m.bn.eps)).detach().double()
    expect = m.c2.weight.detach().double().sum((2, 3)) * scale[None, :]  # scales c2's inputs
    np.testing.assert_allclose(edges_of(g, "c1", "c2"), expect.numpy(), rtol=1e-5, atol=1e-5)


class Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(2, 3, 1)
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        a = F.relu(self.c(x))
        return self.fc((a + a).mean((2, 3)))


def test_tensor_added_to_itself():
    g = weights(Twice(), (2, 4, 4))
    np.testing.assert_array_equal(np.diag(edges_of(g, "c", "add")), 2.0)


class BranchBN(nn.Module):
    """``c0``'s output has three readers: a BatchNorm then a grouped conv, a 1x1 conv, and a
    BatchNorm straight into a concat; a BatchNorm follows the concat."""

    def __init__(self):
        super().__init__()
        self.c0 = nn.Conv2d(2, 4, 3, padding=1)
        self.bn_g = nn.BatchNorm2d(4)
        self.g = nn.Conv2d(4, 4, 3, padding=1, groups=2)
        self.c1 = nn.Conv2d(4, 2, 1)
        self.bn_d = nn.BatchNorm2d(4)
        self.bn_cat = nn.BatchNorm2d(10)
        self.fc = nn.Linear(10, 3)

    def forward(self, x):
        a = self.c0(x)
        y = torch.cat([self.g(self.bn_g(a)), self.c1(a), self.bn_d(a)], dim=1)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(F.relu(self.bn_cat(y)), 1), 1))


@pytest.mark.parametrize("reduce", ["sum", "l1", "l2"])
def test_batchnorm_on_branches_grouped_conv_and_concat_by_hand(reduce):
    m = seeded(BranchBN(), seed=5)
    with torch.no_grad():  # gammas of both signs in every BatchNorm
        for bn in (m.bn_g, m.bn_d, m.bn_cat):
            bn.weight.copy_(bn.weight.abs() * torch.tensor([1.0, -1.0]).repeat(bn.num_features // 2))
    g = weights(m, (2, 5, 5), reduce=reduce)

    def kernel(conv: nn.Module) -> np.ndarray:  # (out, in per group): the kernel reduced as `reduce` says
        w = conv.weight.detach().double().flatten(2)
        return {"sum": w.sum(-1), "l1": w.abs().sum(-1), "l2": w.pow(2).sum(-1).sqrt()}[reduce].numpy()

    def scale(bn: nn.Module) -> np.ndarray:  # gamma / sqrt(var + eps); |.| unless the reduction is signed
        s = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach().double().numpy()
        return s if reduce == "sum" else np.abs(s)

    nan = np.nan
    s_g, s_d, s_cat = scale(m.bn_g), scale(m.bn_d), scale(m.bn_cat)
    np.testing.assert_allclose(edges_of(g, "input", "c0"), kernel(m.c0), rtol=1e-5, atol=1e-5)
    # Grouped conv: output j (group j // 2) reads c0 units 2 * (j // 2) + c, each scaled by bn_g.
    K = kernel(m.g)
    expect_g = np.array([[K[j, i % 2] * s_g[i] if i // 2 == j // 2 else nan for i in range(4)] for j in range(4)])
    np.testing.assert_allclose(edges_of(g, "c0", "g"), expect_g, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(edges_of(g, "c0", "c1"), kernel(m.c1), rtol=1e-5, atol=1e-5)
    # Concat: operands at offsets 0 (g), 4 (c1), 6 (c0 through bn_d), each scaled by bn_cat's
    # channels at its own offset.
    for src, offset, n, extra in (("g", 0, 4, 1.0), ("c1", 4, 2, 1.0), ("c0", 6, 4, s_d)):
        expect = np.full((10, n), nan)
        expect[offset + np.arange(n), np.arange(n)] = s_cat[offset : offset + n] * extra
        np.testing.assert_allclose(edges_of(g, src, "cat"), expect, rtol=1e-6, err_msg=src)
    fc = m.fc.weight.detach().double().numpy()
    np.testing.assert_allclose(edges_of(g, "cat", "logits"), fc if reduce == "sum" else np.abs(fc), rtol=1e-6)
    if reduce != "sum":
        assert (g.weight >= 0).all()


class _GatedGelu(nn.Module):
    def __init__(self):
        super().__init__()
        self.c, self.g, self.fc = nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 1), nn.Linear(4, 2)

    def forward(self, x):
        x = self.c(x)
        x = x * torch.sigmoid(self.g(x.mean((2, 3), keepdim=True)))  # a squeeze-excitation gate
        return self.fc(nn.functional.gelu(x).mean((2, 3)))


def test_meta_says_what_the_weight_graph_leaves_out():
    """Rule.weight_note was set on every rule and read nowhere: a weight graph of a gated model
    now says the gate and the smooth activation are not folded into its edges."""
    from connectome.extract.rules import RULES

    g = weights(_GatedGelu(), (3, 8, 8))
    assert g.meta["not_folded"] == sorted([RULES["gate"].weight_note, RULES["smooth"].weight_note])
    plain = weights(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 2)), (3, 8, 8))
    assert "not_folded" not in plain.meta
