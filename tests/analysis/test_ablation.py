"""ablate and fidelity on a hand-wired model whose class-0 logit reads only hidden:0 and hidden:1."""

from __future__ import annotations

import json
from functools import partial

import numpy as np
import pytest
import torch
import torch.nn as nn

from connectome import analysis
from connectome.analysis._toys import wired_mlp
from connectome.analysis.ablation import AblationResult, FidelityResult
from connectome.errors import ConnectomeError, DataError, EmptyGraphError
from connectome.graph import Connectome

# CPU always (exact tolerances); CUDA parity is tested separately under the gpu marker.
ablate = partial(analysis.ablate, device="cpu")
fidelity = partial(analysis.fidelity, device="cpu")

BIAS0, BIAS1 = 0.5, 2.0


def _wired() -> nn.Module:
    """input(4) -> hidden(8) -> ReLU -> logits(2).

    Hidden units are ``relu(small weights . x + 3)``, active on small inputs; logit 0 is
    ``hidden:0 + 0.5 * hidden:1 + 0.5`` and logit 1 the constant 2.0: only hidden:0 and
    hidden:1 matter.
    """
    w = torch.zeros(2, 8)
    w[0, 0], w[0, 1] = 1.0, 0.5
    return wired_mlp(0.1 * torch.randn(8, 4, generator=torch.Generator().manual_seed(0)), torch.full((8,), 3.0), w,
                     [BIAS0, BIAS1])


class WiredCNN(nn.Module):
    """A conv model with BatchNorm and a residual add, to ablate layers that have no module."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.relu1(self.bn1(self.conv1(x)))
        h = self.relu2(self.conv2(h) + h)
        h = nn.functional.adaptive_avg_pool2d(h, 2)
        return self.fc(torch.flatten(h, 1))


@pytest.fixture(scope="module")
def data() -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(24, 4, generator=torch.Generator().manual_seed(1))
    return x, torch.zeros(24, dtype=torch.long)


@pytest.fixture
def model() -> nn.Module:
    return _wired()


def _hidden_mean(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.relu(model.hidden(x)).mean(0)


# ---------------------------------------------------------------------- ablate
def test_ablating_the_two_units_leaves_the_bias(model, data):
    x, y = data
    r = ablate(model, ["hidden:0", "hidden:1"], (x, y), target=0)
    h = _hidden_mean(model, x)
    assert isinstance(r, AblationResult)
    assert r.units == ("hidden:0", "hidden:1")
    assert r.n_images == 24
    assert r.logit_before == pytest.approx(float(h[0] + 0.5 * h[1]) + BIAS0, rel=1e-5)
    assert r.logit_after == pytest.approx(BIAS0, abs=1e-6)  # only the bias is left
    assert r.logit_drop == pytest.approx(r.logit_before - BIAS0, rel=1e-5)
    p_after = 1.0 / (1.0 + np.exp(BIAS1 - BIAS0))
    assert r.prob_after == pytest.approx(p_after, rel=1e-5)
    assert r.prob_drop == pytest.approx(r.prob_before - p_after, rel=1e-5)
    assert r.prob_drop > 0
    assert r.acc_before == 1.0 and r.acc_after == 0.0  # logit 0 beats the constant 2.0 only when intact


def test_ablating_other_units_changes_nothing(model, data):
    r = ablate(model, [f"hidden:{i}" for i in range(2, 8)], data, target=0)
    assert r.logit_drop == pytest.approx(0.0, abs=1e-6)
    assert r.prob_drop == pytest.approx(0.0, abs=1e-7)
    assert r.acc_before == r.acc_after


def test_target_label_matches_int_target_and_mapping_input(model, data):
    by_label = ablate(model, "hidden:0", data)  # labels are all 0
    by_int = ablate(model, {"hidden": [0]}, data, target=0)
    assert by_label.logit_drop == pytest.approx(by_int.logit_drop, rel=1e-6)
    assert by_label.target == "label" and by_int.target == 0


def test_circuit_connectome_ablates_its_hidden_nodes_only(model, data):
    full = Connectome.from_edges([("input", "input", 4), ("hidden", "linear", 8), ("logits", "output", 2)])
    c = full.subgraph(["input:0", "hidden:0", "hidden:1", "logits:0"])
    r = ablate(model, c, data, target=0)
    assert r.units == ("hidden:0", "hidden:1")
    assert r.logit_after == pytest.approx(BIAS0, abs=1e-6)


def test_model_is_left_as_found(model, data):
    x, _ = data
    model.train()
    with torch.no_grad():
        before = model(x).clone()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.warns(UserWarning, match="training mode"):
        ablate(model, ["hidden:0"], data, target=0)
    assert model.training and all(m.training for m in model.modules())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=0, atol=0)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, state[k], rtol=0, atol=0)
    assert all(p.requires_grad for p in model.parameters())


def test_unknown_units_are_named_with_the_valid_layers(model, data):
    with pytest.raises(ConnectomeError, match=r"hidden:9.*nolayer:1|nolayer:1.*hidden:9") as e:
        ablate(model, ["hidden:9", "nolayer:1"], data)
    assert "'hidden (8)'" in str(e.value)
    with pytest.raises(ConnectomeError, match="not a node id"):
        ablate(model, ["hidden"], data)


@pytest.mark.parametrize("unit", ["input:0", "logits:1"])
def test_input_and_output_units_are_refused(model, data, unit):
    with pytest.raises(ConnectomeError, match="input and output layers are never ablated"):
        ablate(model, [unit], data)


def test_bad_targets_and_empty_units(model, data):
    x, _ = data
    with pytest.raises(DataError, match="needs labels"):
        ablate(model, ["hidden:0"], x)
    with pytest.raises(DataError, match="out of range"):
        ablate(model, ["hidden:0"], data, target=5)
    with pytest.raises(EmptyGraphError):
        ablate(model, [], data)


def test_images_without_labels_give_nan_accuracy(model, data):
    x, _ = data
    r = ablate(model, ["hidden:0"], x, target=0)
    assert np.isnan(r.acc_before) and np.isnan(r.acc_after)
    d = r.to_dict()
    assert d["acc_before"] is None
    json.dumps(d)
    assert "target prob" in repr(r)


def test_residual_and_batchnorm_layers_can_be_ablated_and_model_kept():
    torch.manual_seed(0)
    m = WiredCNN().eval()
    x = torch.randn(6, 3, 8, 8)
    with torch.no_grad():
        ref = m(x).clone()
    # Silencing every unit of the residual add leaves only the fc bias.
    r = ablate(m, [f"add:{i}" for i in range(4)], x, target=1, batch_size=4)
    assert r.logit_after == pytest.approx(float(m.fc.bias[1].detach()), abs=1e-5)
    # Silencing conv1's units (after BN and the in-place ReLU) zeroes both paths of the block.
    r2 = ablate(m, [f"conv1:{i}" for i in range(4)], x, target=1)
    with torch.no_grad():
        expect = m.fc(torch.zeros(1, 16) + torch.flatten(nn.functional.adaptive_avg_pool2d(
            torch.relu(m.conv2.bias.view(1, 4, 1, 1).expand(1, 4, 8, 8)), 2), 1))[0, 1]
    assert r2.logit_after == pytest.approx(float(expect), abs=1e-5)
    # Flattened units (group > 1): fc reads each add unit as a block of 4 features.
    r3 = ablate(m, ["add:2"], x, target=0)
    with torch.no_grad():
        h = torch.relu(m.conv2(torch.relu(m.bn1(m.conv1(x)))) + torch.relu(m.bn1(m.conv1(x))))
        h[:, 2] = 0
        manual = m.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(h, 2), 1))[:, 0].mean()
    assert r3.logit_after == pytest.approx(float(manual), abs=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(m(x), ref, rtol=0, atol=0)
    assert not m.training


# ---------------------------------------------------------------------- fidelity
def test_fidelity_circuit_beats_random(model, data):
    f = fidelity(model, ["hidden:0", "hidden:1"], data, n_random=20, seed=0, target=0)
    assert isinstance(f, FidelityResult)
    assert f.sizes == {"hidden": 2} and f.n_units == 2
    assert f.random_drops.shape == (20,)
    assert f.circuit_drop > f.random_mean
    assert f.z > 0
    assert f.circuit_drop == pytest.approx(ablate(model, ["hidden:0", "hidden:1"], data, target=0).prob_drop, rel=1e-6)
    # Everything else in the layer is irrelevant to class 0.
    assert f.complement_drop == pytest.approx(0.0, abs=1e-7)
    assert f.complement_logit_drop == pytest.approx(0.0, abs=1e-6)
    # A random pair drops exactly what its overlap with {0, 1} drops: never more than the circuit.
    assert np.all(f.random_drops <= f.circuit_drop + 1e-7)
    assert 0 < f.p_value <= 1


def test_fidelity_curves(model, data):
    full = Connectome.from_edges([("input", "input", 4), ("hidden", "linear", 8), ("logits", "output", 2)])
    attr = np.zeros(14)
    attr[full.index_of("hidden:0")], attr[full.index_of("hidden:1")] = 5.0, -1.0
    c = full.with_node_attrs(attribution=attr).subgraph(["hidden:0", "hidden:1", "logits:0"])
    f = fidelity(model, c, data, n_random=5, target=0, steps=2)
    x = f.curve_x
    np.testing.assert_allclose(x, [0.0, 0.5, 1.0])
    d, i = f.deletion_curve, f.insertion_curve
    assert d[0] == pytest.approx(f.prob_before, rel=1e-6)
    assert d[-1] == pytest.approx(f.prob_before - f.circuit_drop, rel=1e-6)
    assert i[-1] == pytest.approx(f.prob_before - f.complement_drop, rel=1e-6)
    assert i[0] == pytest.approx(1.0 / (1.0 + np.exp(BIAS1 - BIAS0)), rel=1e-5)  # whole layer silenced
    # hidden:0 (|attribution| 5) goes first: deletion falls, insertion rises, monotonically.
    assert np.all(np.diff(d) < 0) and np.all(np.diff(i) > 0)
    assert d[1] == pytest.approx(ablate(model, ["hidden:0"], data, target=0).prob_after, rel=1e-6)
    assert 0 <= f.deletion_auc <= 1 and 0 <= f.insertion_auc <= 1
    assert f.deletion_auc < f.insertion_auc
    assert f.deletion_auc == pytest.approx(0.25 * d[0] + 0.5 * d[1] + 0.25 * d[2], rel=1e-9)
    json.dumps(f.to_dict())
    assert "deletion AUC" in repr(f)


def test_fidelity_without_curves_and_seeded(model, data):
    a = fidelity(model, ["hidden:0", "hidden:1"], data, n_random=8, seed=3, target=0, curves=False)
    b = fidelity(model, ["hidden:0", "hidden:1"], data, n_random=8, seed=3, target=0, curves=False)
    assert a.curve_x is None and np.isnan(a.deletion_auc)
    np.testing.assert_array_equal(a.random_drops, b.random_drops)
    with pytest.raises(ValueError, match="n_random"):
        fidelity(model, ["hidden:0"], data, n_random=-1)


def test_fidelity_orders_by_degree_without_attribution(model, data):
    layers = [("input", "input", 4), ("hidden", "linear", 8), ("logits", "output", 2)]
    edges = [("input:0", "hidden:1", 1.0), ("input:1", "hidden:1", 1.0), ("input:0", "hidden:0", 1.0),
             ("hidden:0", "logits:0", 1.0), ("hidden:1", "logits:0", 1.0)]
    c = Connectome.from_edges(layers, edges).subgraph(["input:0", "input:1", "hidden:0", "hidden:1", "logits:0"])
    f = fidelity(model, c, data, n_random=2, target=0, steps=2)
    # hidden:1 has degree 3, hidden:0 degree 2: hidden:1 is removed first.
    assert f.deletion_curve[1] == pytest.approx(ablate(model, ["hidden:1"], data, target=0).prob_after, rel=1e-6)


def test_fidelity_of_an_extracted_circuit(model, data):
    from connectome.analysis import circuit
    from connectome.extract import attribution

    g = attribution(model, data, target=0, device="cpu", progress=False)
    c = circuit(g, target="logits:0", mass=0.8)
    hidden = [n for n in c.node_ids.tolist() if n.startswith("hidden:")]
    assert hidden == ["hidden:0", "hidden:1"]  # the only units with flow into logit 0
    f = fidelity(model, c, data, n_random=10, target=0)
    assert f.circuit_drop > f.random_mean and f.complement_drop == pytest.approx(0.0, abs=1e-7)
    assert f.deletion_auc < f.insertion_auc


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu_and_model_stays_put(model, data):
    cpu = ablate(model, ["hidden:0"], data, target=0)
    gpu = analysis.ablate(model, ["hidden:0"], data, target=0, device="cuda")
    assert gpu.logit_after == pytest.approx(cpu.logit_after, rel=1e-4)
    assert gpu.prob_drop == pytest.approx(cpu.prob_drop, rel=1e-3, abs=1e-6)
    f = analysis.fidelity(model, ["hidden:0", "hidden:1"], data, n_random=4, target=0, device="cuda")
    assert f.circuit_drop == pytest.approx(fidelity(model, ["hidden:0", "hidden:1"], data, n_random=4, target=0).circuit_drop, rel=1e-3)
    assert all(p.device.type == "cpu" for p in model.parameters())
