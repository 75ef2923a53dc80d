"""compare_activations: identical images, hand-computed differences, maps and errors."""

from __future__ import annotations

import json
from functools import partial

import numpy as np
import pytest
import torch
import torch.nn as nn

from connectome import analysis
from connectome.analysis.activations import ActivationComparison, LayerActivationDiff
from connectome.errors import ConnectomeError

# CPU always (exact tolerances); CUDA parity is tested separately under the gpu marker.
compare_activations = partial(analysis.compare_activations, device="cpu")


class Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 12, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(12)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(12, 6, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.fc = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.relu1(self.bn1(self.conv1(x)))
        h = self.relu2(self.conv2(h))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(h, 1), 1))


@pytest.fixture(scope="module")
def model() -> Small:
    torch.manual_seed(0)
    m = Small()
    with torch.no_grad():
        m.bn1.bias.fill_(0.2)
        m.conv2.bias.fill_(0.2)
    return m.eval()


@pytest.fixture(scope="module")
def images() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    return torch.randn(3, 10, 10, generator=g), torch.randn(3, 10, 10, generator=g)


def test_identical_images_differ_nowhere(model, images):
    a, _ = images
    c = compare_activations(model, a, a[None].clone(), top=5)
    assert isinstance(c, ActivationComparison)
    assert c.layers == ["conv1", "conv2", "logits"]  # the input layer is left out by default
    for r in c.per_layer:
        assert isinstance(r, LayerActivationDiff)
        np.testing.assert_array_equal(r.diff, 0.0)
        assert r.correlation == 1.0
    assert len(c["conv1"].units) == 5 and len(c["conv2"].units) == 5 and len(c["logits"].units) == 4
    # With no differences, ties keep unit order.
    np.testing.assert_array_equal(c["conv1"].units, np.arange(5))


def test_differences_match_a_hand_computation(model, images):
    a, b = images
    c = compare_activations(model, a, b, top=4)
    with torch.no_grad():
        h1 = torch.relu(model.bn1(model.conv1(torch.stack([a, b]))))
        h2 = torch.relu(model.conv2(h1))
        logits = model(torch.stack([a, b]))
    for name, v in (("conv1", h1.mean((2, 3))), ("conv2", h2.mean((2, 3))), ("logits", logits)):
        v = v.double().numpy()
        d = v[0] - v[1]
        r = c[name]
        np.testing.assert_array_equal(r.units, np.argsort(-np.abs(d), kind="stable")[:4])
        np.testing.assert_allclose(r.diff, d[r.units], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(r.a, v[0, r.units], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(r.b, v[1, r.units], rtol=1e-5, atol=1e-6)
        assert np.all(np.diff(np.abs(r.diff)) <= 1e-12)
        assert r.correlation == pytest.approx(np.corrcoef(v[0], v[1])[0, 1], rel=1e-5)
        assert r.node_ids == tuple(f"{name}:{u}" for u in r.units)
        np.testing.assert_allclose(c.activations_a[name], v[0], rtol=1e-5, atol=1e-6)
    # Spatial maps of the top units, image A first.
    assert c.maps["conv1"].shape == (2, 4, 10, 10) and "logits" not in c.maps
    np.testing.assert_allclose(c.maps["conv2"], h2[:, c["conv2"].units].numpy(), rtol=1e-5, atol=1e-6)


def test_layers_and_options(model, images):
    a, b = images
    c = compare_activations(model, a, b, layers=["conv2"], top=50, keep_maps=False)
    assert c.layers == ["conv2"] and len(c["conv2"].units) == 6 and c.maps == {}
    d = c.to_dict()
    json.dumps(d)
    assert d["layers"][0]["layer"] == "conv2"
    assert "conv2" in repr(c) and "diff = image A - image B" in repr(c)
    with pytest.raises(KeyError):
        c["conv1"]


def test_model_left_as_found_and_errors(model, images):
    a, b = images
    model.train()
    try:
        with pytest.warns(UserWarning, match="training mode"):
            compare_activations(model, a, b, layers=["conv1"])
        assert model.training and model.bn1.training
        assert all(not m._forward_hooks for m in model.modules())
    finally:
        model.eval()
    with pytest.raises(ValueError, match="differ in shape"):
        compare_activations(model, a, b[:, :8])
    with pytest.raises(ValueError, match="shape"):
        compare_activations(model, torch.stack([a, b]), b)
    with pytest.raises(ValueError, match="top"):
        compare_activations(model, a, b, top=0)
    with pytest.raises(ConnectomeError, match="no layer"):
        compare_activations(model, a, b, layers=["nope"])
