"""Unit activations: the value each unit passes on (after BatchNorm and nonlinearity), per image."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import connectome as cn
from connectome.errors import ConnectomeError
from connectome.extract.activations import activations


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 5, 3, padding=1)
        self.fc = nn.Linear(5, 3)

    def forward(self, x):
        a = F.relu(self.bn1(self.conv1(x)))
        b = F.relu(self.conv2(a))
        return self.fc(b.mean((2, 3)))


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = Net().double().eval()
    with torch.no_grad():
        m.bn1.running_mean.normal_()
        m.bn1.running_var.uniform_(0.5, 2.0)
        m.bn1.weight.normal_()
    return m


@pytest.fixture(scope="module")
def x():
    return torch.randn(3, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


def reference(model, x):
    with torch.no_grad():
        a = F.relu(model.bn1(model.conv1(x)))
        b = F.relu(model.conv2(a))
        return {"input": x, "conv1": a, "conv2": b, "logits": model(x)}


def test_spatial_means(model, x):
    acts = activations(model, x)
    assert list(acts) == ["input", "conv1", "conv2", "logits"]
    assert [l.name for l in acts.layers] == list(acts)
    ref = reference(model, x)
    shapes = {"input": (3, 3), "conv1": (3, 4), "conv2": (3, 5), "logits": (3, 3)}
    for name, arr in acts.items():
        assert arr.shape == shapes[name], name
        r = ref[name] if ref[name].dim() == 2 else ref[name].mean((2, 3))
        # activations are returned as float32
        np.testing.assert_allclose(arr, r.numpy(), rtol=1e-5, atol=1e-6, err_msg=name)
    assert acts.labels is None


def test_spatial_maps(model, x):
    acts = activations(model, x, spatial=True)
    ref = reference(model, x)
    assert acts["input"].shape == (3, 3, 8, 8)
    assert acts["conv1"].shape == (3, 4, 6, 6)
    assert acts["logits"].shape == (3, 3)
    np.testing.assert_allclose(acts["conv1"], ref["conv1"].numpy(), rtol=1e-5, atol=1e-6)
    # conv2's maps: see test_spatial_maps_before_flatten_or_global_pool


def test_layer_selection(model, x):
    y = torch.tensor([2, 0, 1])
    acts = activations(model, (x, y), layers=["conv2", "fc"], batch_size=2)
    assert set(acts) == {"conv2", "logits"}  # the output module 'fc' is the graph layer 'logits'
    assert acts["conv2"].shape == (3, 5)
    np.testing.assert_array_equal(acts.labels, [2, 0, 1])
    assert [l.name for l in acts.layers] == ["conv2", "logits"]


def test_single_image_and_batches(model, x):
    one = activations(model, x[0])
    assert one["conv1"].shape == (1, 4)
    batched = activations(model, x, batch_size=1)
    whole = activations(model, x)
    for k in whole:
        np.testing.assert_allclose(batched[k], whole[k], rtol=1e-6)


def test_unknown_layer(model, x):
    with pytest.raises(ConnectomeError, match="no layer 'conv9' in the model's unit graph; layers are"):
        activations(model, x, layers=["conv9"])


def test_model_left_as_found(model, x):
    model.train()
    try:
        with pytest.warns(UserWarning, match="training mode"):
            acts = activations(model, x)
        assert model.training and model.bn1.training
    finally:
        model.eval()
    np.testing.assert_allclose(acts["conv1"], activations(model, x)["conv1"])  # ran with running statistics


def test_layer_asked_twice(model, x):
    acts = activations(model, x, layers=["conv1", "conv1"])
    assert acts["conv1"].shape == (3, 4)


@pytest.mark.parametrize("head", ["flatten", "mean"])
def test_spatial_maps_before_flatten_or_global_pool(model, x, head):
    if head == "flatten":
        m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2)).eval()
        assert activations(m, x.float(), spatial=True)["0"].shape == (3, 4, 6, 6)
    else:
        assert activations(model, x, spatial=True)["conv2"].shape == (3, 5, 6, 6)


def test_public_name_is_the_function():
    import connectome.extract.activations as _module  # any import of the submodule, e.g. by the CLI

    assert _module is not None
    assert cn.extract.activations is activations
