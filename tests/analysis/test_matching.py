"""match_units on permuted copies (known answer: the inverse permutation) and universality."""

from __future__ import annotations

import copy
import json
from functools import partial

import numpy as np
import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

from connectome import analysis
from connectome.analysis import universality
from connectome.analysis.matching import UnitMatching, UniversalityResult, _assign, _correlate
from connectome.errors import ConnectomeError
from connectome.graph import Connectome

# CPU always (exact tolerances); CUDA parity is tested separately under the gpu marker.
match_units = partial(analysis.match_units, device="cpu")


class Net(nn.Module):
    """conv1 (BN, ReLU) -> conv2 (ReLU) -> global pool -> fc1 (ReLU) -> fc2 (logits)."""

    def __init__(self, c1: int = 6, c2: int = 8, f1: int = 5, classes: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, c1, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(c1)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Linear(c2, f1)
        self.relu3 = nn.ReLU()
        self.fc2 = nn.Linear(f1, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.relu1(self.bn1(self.conv1(x)))
        h = self.relu2(self.conv2(h))
        h = torch.flatten(self.pool(h), 1)
        return self.fc2(self.relu3(self.fc1(h)))


class Deep(nn.Module):
    """Four convs, for pairing by relative depth against Net's two."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2, self.c3, self.c4 = (nn.Conv2d(i, o, 3, padding=1) for i, o in ((3, 4), (4, 4), (4, 4), (4, 4)))
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for c in (self.c1, self.c2, self.c3, self.c4):
            x = torch.relu(c(x))
        return self.fc(x.mean((2, 3)))


def _net(seed: int = 0, **kw) -> Net:
    torch.manual_seed(seed)
    m = Net(**kw)
    with torch.no_grad():
        m.bn1.running_mean.uniform_(-0.2, 0.2)
        m.bn1.running_var.uniform_(0.5, 2.0)
        m.bn1.weight.uniform_(0.5, 1.5)
        m.bn1.bias.fill_(0.5)  # keep conv1 units alive on most positions
        m.conv2.bias.fill_(0.3)
        m.fc1.bias.fill_(0.5)
    return m.eval()


def _permuted(m: Net, p1: torch.Tensor, p2: torch.Tensor, p3: torch.Tensor) -> Net:
    """The same function with conv1, conv2 and fc1 units reordered: B's unit j is A's unit p[j]."""
    b = copy.deepcopy(m)
    with torch.no_grad():
        b.conv1.weight.copy_(m.conv1.weight[p1])
        b.conv1.bias.copy_(m.conv1.bias[p1])
        for name in ("weight", "bias", "running_mean", "running_var"):
            getattr(b.bn1, name).copy_(getattr(m.bn1, name)[p1])
        b.conv2.weight.copy_(m.conv2.weight[p2][:, p1])
        b.conv2.bias.copy_(m.conv2.bias[p2])
        b.fc1.weight.copy_(m.fc1.weight[p3][:, p2])
        b.fc1.bias.copy_(m.fc1.bias[p3])
        b.fc2.weight.copy_(m.fc2.weight[:, p3])
    return b


@pytest.fixture(scope="module")
def probe() -> torch.Tensor:
    return torch.randn(12, 3, 8, 8, generator=torch.Generator().manual_seed(5))


@pytest.fixture(scope="module")
def perms():
    g = torch.Generator().manual_seed(11)
    return torch.randperm(6, generator=g), torch.randperm(8, generator=g), torch.randperm(5, generator=g)


@pytest.fixture(scope="module")
def pair(perms):
    a = _net(0)
    return a, _permuted(a, *perms)


@pytest.fixture(scope="module")
def matched(pair, probe) -> UnitMatching:
    a, b = pair
    return match_units(a, b, probe, batch_size=5)


# ---------------------------------------------------------------------- match_units
def test_permuted_copy_computes_the_same_function(pair, probe):
    a, b = pair
    with torch.no_grad():
        torch.testing.assert_close(a(probe), b(probe), rtol=1e-5, atol=1e-5)


def test_permuted_copy_is_matched_back_exactly(matched, perms):
    assert matched.layer_pairs == (("conv1", "conv1"), ("conv2", "conv2"), ("fc1", "fc1"), ("logits", "logits"))
    for layer, p in zip(("conv1", "conv2", "fc1"), perms):
        inverse = torch.argsort(p).numpy()
        np.testing.assert_array_equal(matched.mapping(layer), inverse)
        np.testing.assert_allclose(matched.correlation(layer), 1.0, atol=1e-6)
    np.testing.assert_array_equal(matched.mapping("logits"), np.arange(3))
    np.testing.assert_allclose(matched.correlation("logits"), 1.0, atol=1e-6)
    assert matched.summary() == pytest.approx({"conv1": 1.0, "conv2": 1.0, "fc1": 1.0, "logits": 1.0}, abs=1e-6)
    assert matched.modes == {"conv1": "positions", "conv2": "positions", "fc1": "images", "logits": "images"}
    assert matched.sizes["conv2"] == (8, 8)
    assert matched.kinds["fc1"] == ("linear", "linear") and matched.kinds["logits"] == ("output", "output")


def test_map_node(matched, perms):
    p1 = perms[0]
    for u in range(6):
        assert matched.map_node(f"conv1:{u}") == f"conv1:{int(torch.argsort(p1)[u])}"
    assert matched.map_node("input:0") is None
    assert matched.partner_layer("fc1") == "fc1"
    with pytest.raises(ConnectomeError):
        matched.map_node("conv1:99")
    with pytest.raises(ConnectomeError, match="not matched"):
        matched.mapping("nolayer")


def test_spatial_means_also_match(pair, probe, perms):
    m = match_units(*pair, probe, spatial=False, layer_pairs=[("conv1", "conv1")])
    assert m.layer_pairs == (("conv1", "conv1"),) and m.modes == {"conv1": "images"}
    np.testing.assert_array_equal(m.mapping("conv1"), torch.argsort(perms[0]).numpy())


def test_rectangular_matching_leaves_surplus_units_unmatched(probe):
    wide, narrow = _net(1, c1=6, c2=8), _net(2, c1=4, c2=5)
    m = match_units(wide, narrow, probe)
    for layer, (ua, ub) in (("conv1", (6, 4)), ("conv2", (8, 5))):
        mp = m.mapping(layer)
        assert m.sizes[layer] == (ua, ub) and mp.shape == (ua,)
        assert (mp == -1).sum() == ua - ub
        matched = mp[mp >= 0]
        assert len(set(matched.tolist())) == ub and matched.min() >= 0 and matched.max() < ub
        c = m.correlation(layer)
        assert np.isnan(c[mp == -1]).all() and np.all(np.abs(c[mp >= 0]) <= 1)
        assert m.map_node(f"{layer}:{int(np.flatnonzero(mp == -1)[0])}") is None
    back = match_units(narrow, wide, probe, layer_pairs=[("conv1", "conv1")])
    assert (back.mapping("conv1") >= 0).all() and len(set(back.mapping("conv1").tolist())) == 4


def test_pairs_by_relative_depth(probe):
    torch.manual_seed(3)
    deep = Deep().eval()
    # Deep: input 0, c1 .2, c2 .4, c3 .6, c4 .8, logits 1; Net: input 0, conv1 .25, conv2 .5, fc1 .75, logits 1
    m = match_units(deep, _net(0), probe)
    assert m.layer_pairs == (("c1", "conv1"), ("c2", "conv2"), ("c3", "conv2"), ("c4", "conv2"), ("logits", "logits"))
    m2 = match_units(_net(0), deep, probe)
    # conv2 (.5) is as near c2 (.4) as c3 (.6): the earlier wins. fc1 (linear) has no linear
    # partner among Deep's hidden layers: the nearest hidden layer of any kind (c4 at .8).
    assert m2.layer_pairs == (("conv1", "c1"), ("conv2", "c2"), ("fc1", "c4"), ("logits", "logits"))
    assert m2.modes["fc1"] == "images"


def test_bad_layer_pairs(pair, probe):
    with pytest.raises(ConnectomeError, match="no layer 'nope' in model B"):
        match_units(*pair, probe, layer_pairs=[("conv1", "nope")])
    with pytest.raises(ValueError, match="twice"):
        match_units(*pair, probe, layer_pairs=[("conv1", "conv1"), ("conv1", "conv2")])


def test_models_left_as_found(probe):
    a, b = _net(0), _net(1)
    a.train()
    ref = b(probe).detach().clone()
    with pytest.warns(UserWarning, match="training mode"):
        match_units(a, b, probe, layer_pairs=[("conv1", "conv1")])
    assert a.training and all(mod.training for mod in a.modules())
    assert not b.training
    assert all(not mod._forward_hooks for mod in (*a.modules(), *b.modules()))
    torch.testing.assert_close(b(probe), ref, rtol=0, atol=0)


def test_to_dict_and_repr(matched):
    d = matched.to_dict()
    json.dumps(d)
    assert d["layers"]["conv1"]["mapping"] == matched.mapping("conv1").tolist()
    r = repr(matched)
    assert r.startswith("UnitMatching(4 layer pairs, 12 probe images)") and "conv2" in r


def test_constant_units_correlate_zero():
    x = torch.randn(50, 3, dtype=torch.float64)
    c = _correlate(torch.cat([x, torch.ones(50, 1, dtype=torch.float64)], 1), x)
    np.testing.assert_allclose(c[3], 0.0)
    np.testing.assert_allclose(np.diag(c[:3]), 1.0, atol=1e-12)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(2, 9), seed=st.integers(0, 2**16))
def test_assignment_recovers_any_permutation(n, seed):
    rng = np.random.default_rng(seed)
    x = torch.from_numpy(rng.normal(size=(40, n)))
    perm = rng.permutation(n)
    mp = _assign(_correlate(x, x[:, perm]))
    np.testing.assert_array_equal(perm[mp], np.arange(n))


# ---------------------------------------------------------------------- universality
LAYERS = [("input", "input", 3), ("conv1", "conv", 6), ("conv2", "conv", 8), ("fc1", "linear", 5),
          ("logits", "output", 3)]


def _graph(category: str) -> Connectome:
    """A dense weight-like graph over Net's layers, with flows favouring a few units."""
    rng = np.random.default_rng(sum(map(ord, category)))
    edges = []
    sizes = [s for _, _, s in LAYERS]
    names = [n for n, _, _ in LAYERS]
    for li in range(len(LAYERS) - 1):
        for i in range(sizes[li]):
            for j in range(sizes[li + 1]):
                strong = i % 3 == 0 and (j % 3 == 0 or names[li + 1] == "logits")
                w = rng.uniform(0.0, 0.05) + (5.0 if strong else 0.0)
                edges.append((f"{names[li]}:{i}", f"{names[li + 1]}:{j}", w))
    out = Connectome.from_edges(LAYERS, edges, meta={"category": category})
    return out.with_labels("logits", ["a", "b", "c"])


def test_identical_models_overlap_fully_and_far_above_chance(probe):
    a = _net(0)
    m = match_units(a, a, probe)
    np.testing.assert_array_equal(m.mapping("conv2"), np.arange(8))
    graphs = {"a": _graph("a"), "c": _graph("c")}
    u = universality({"net": graphs, "copy": graphs}, m, mass=0.8, n_random=100, seed=0)
    assert isinstance(u, UniversalityResult)
    assert u.categories == ["a", "c"]
    for row in u.per_category:
        assert row.overlap == 1.0
        assert row.n_units == row.n_mapped == row.n_hits > 0
        assert row.random_mean < 0.7
        assert row.z > 2
        assert row.p_value == pytest.approx(1 / 101)
        assert set(row.per_layer) <= {"conv1", "conv2", "fc1"}
    assert u.overlap == 1.0 and u.random_mean < 0.7
    json.dumps(u.to_dict())
    assert "mean overlap 1.000" in repr(u)


def test_universality_with_precomputed_circuits(matched, perms):
    p1 = perms[0]
    # A's circuit: conv1 units 0 and 1; B's circuit holds their partners and one stray unit.
    partners = torch.argsort(p1)[:2].tolist()
    stray = next(u for u in range(6) if u not in partners)
    ca = ["conv1:0", "conv1:1", "logits:0"]
    cb = [f"conv1:{partners[0]}", f"conv1:{stray}", "logits:0"]
    g = {"x": _graph("a")}
    u = universality({"A": g, "B": g}, matched, n_random=50, circuits={"A": {"x": ca}, "B": {"x": cb}})
    row = u["x"]
    assert (row.n_units, row.n_mapped, row.n_hits) == (2, 2, 1)
    assert row.overlap == 0.5
    assert row.per_layer["conv1"]["overlap"] == 0.5
    # Chance for 2 random units of 6 landing in a 2-unit set: 2/6 on average.
    assert row.random_mean == pytest.approx(1 / 3, abs=0.1)


def test_universality_argument_errors(matched):
    g = {"x": _graph("a")}
    with pytest.raises(ValueError, match="exactly two"):
        universality({"A": g}, matched)
    with pytest.raises(ValueError, match="share no category"):
        universality({"A": g, "B": {"y": _graph("a")}}, matched)
    with pytest.raises(TypeError, match="UnitMatching"):
        universality({"A": g, "B": g}, {"conv1": [0]})


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matching_agrees_with_cpu(pair, probe, perms):
    m = analysis.match_units(*pair, probe, device="cuda")
    for layer, p in zip(("conv1", "conv2", "fc1"), perms):
        np.testing.assert_array_equal(m.mapping(layer), torch.argsort(p).numpy())
    assert all(p.device.type == "cpu" for p in pair[0].parameters())


def test_universality_warns_about_unmatched_circuit_layers(pair, probe):
    m = match_units(*pair, probe, layer_pairs=[("conv1", "conv1")])
    g = {"x": _graph("a")}
    circuits = {"A": {"x": ["conv1:0", "conv2:1"]}, "B": {"x": ["conv1:0"]}}
    with pytest.warns(UserWarning, match=r"layers \['conv2'\] are left out"):
        u = universality({"A": g, "B": g}, m, n_random=10, circuits=circuits)
    assert u["x"].n_units == 1
